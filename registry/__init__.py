"""peftreg registry service: OCI Distribution API plus a JSON management API."""
