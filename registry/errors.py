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


class DeleteUnsupported(RegistryError):
    """An OCI DELETE the registry's policy forbids (an immutable release tag): 405."""


class VersionInUse(RegistryError):
    """A manifest that tags still point at, deleted without `force`."""


class Unauthorized(RegistryError):
    """No (valid) credentials: 401 with a challenge naming the access the request needs."""

    def __init__(
        self,
        message: str,
        *,
        detail: Any = None,
        access: str | None = None,
        insufficient_scope: bool = False,
    ) -> None:
        super().__init__(message, detail=detail)
        self.access = access  # `repository:ns/name:pull,push`, for the Bearer challenge
        self.insufficient_scope = insufficient_scope


class InsufficientScope(Unauthorized):
    """A registry token without the access a request needs: 403 with a challenge naming it
    (RFC 6750's `insufficient_scope`), so clients fetch a token for that scope."""

    def __init__(self, message: str, *, access: str) -> None:
        super().__init__(message, access=access, insufficient_scope=True)


class Denied(RegistryError):
    pass


class NotFound(RegistryError):
    """A resource outside the OCI and job vocabularies that does not exist (404)."""


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
