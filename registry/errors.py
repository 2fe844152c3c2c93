"""Errors of the registry's domain layer.

Each names its cause; `peftreg.registry.api.errors` maps every class once to an
HTTP status and an OCI error code.
"""

from __future__ import annotations

from typing import Any


class RegistryError(Exception):
    """Base class: a request the registry refuses, with a message for the user."""

    def __init__(self, message: str, *, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class NameInvalid(RegistryError):
    pass


class NameUnknown(RegistryError):
    pass


class TagInvalid(RegistryError):
    pass


class DigestInvalid(RegistryError):
    pass


class BlobUnknown(RegistryError):
    pass


class BlobUploadUnknown(RegistryError):
    pass


class BlobUploadInvalid(RegistryError):
    pass


class UploadInUse(RegistryError):
    """Another request is writing or completing the same upload session."""


class RangeInvalid(RegistryError):
    """A chunk that does not start at the upload's current offset."""

    def __init__(self, message: str, *, current_size: int) -> None:
        super().__init__(message, detail={"offset": current_size})
        self.current_size = current_size


class ManifestInvalid(RegistryError):
    pass


class ManifestUnknown(RegistryError):
    pass


class ManifestBlobUnknown(RegistryError):
    pass


class ManifestTooLarge(RegistryError):
    pass


class ArtifactInvalid(RegistryError):
    """An adapter or base artifact whose config or tensors do not hold up (422)."""


class SafetensorsInvalid(ArtifactInvalid):
    """A safetensors layer that is not a well-formed safetensors file (422)."""


class LayerTitleInvalid(RegistryError):
    """A layer title of a peftreg artifact that would write outside a pulled directory,
    or collide with another layer's (422)."""


class TagImmutable(RegistryError):
    pass


class VersionInUse(RegistryError):
    """A manifest that tags still point at, deleted without `force`."""


class Unauthorized(RegistryError):
    pass


class Denied(RegistryError):
    pass


class TokenUnknown(RegistryError):
    pass


class InvalidRequest(RegistryError):
    pass


class JobUnknown(RegistryError):
    """No job with that id (or none the caller may see)."""


class JobInvalid(RegistryError):
    """A job request that cannot run: wrong artifact types, kinds or parameters."""


class BaseIncompatible(RegistryError):
    """An adapter that was not trained on the base it is to be merged into."""


class JobFinished(RegistryError):
    """The job already ended, so it cannot be cancelled."""
