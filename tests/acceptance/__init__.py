"""Acceptance tests: real OCI clients (oras) against a running registry."""
