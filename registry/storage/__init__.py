"""Blob storage: the `BlobStore` protocol and one module per backend."""
