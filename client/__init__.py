"""peftreg library: manifests, digests, formats, SDK and CLI shared with the service."""
