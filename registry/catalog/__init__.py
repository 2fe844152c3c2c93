"""Domain services over metadata and blobs: repositories, uploads, manifests, tags."""
