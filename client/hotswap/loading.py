"""Finding an adapter for a swap: the host's LRU first, else the disk or the registry.

A source is a reference (`"acme/bot:v3"`, `Reference`), a `PullResult`, a
local PEFT directory (`Path`, or a `str` naming a directory that exists) or
an already `LoadedAdapter`. Every kind is
looked up in the cache by its digest before anything is read: a tag is
resolved to its digest (one small request), a directory is named by its
`directory_identity` (config and tensor header, no tensor data). A miss is
pulled or read and checked (`peftreg.hotswap.adapter`). The loader never
inserts into the cache itself: the host does that once the adapter passed
its plan, so an adapter the host refuses does not evict good ones.
"""

from __future__ import annotations

from pathlib import Path

from peftreg.hotswap.adapter import (
    LoadedAdapter,
    adapter_from_local,
    adapter_from_pull,
    inspect_directory,
)
from peftreg.hotswap.cache import AdapterCache
from peftreg.hotswap.errors import HostError, SwapError
from peftreg.reference import InvalidReference, Reference
from peftreg.sdk.client import Client
from peftreg.transfer.pull import PullResult

AdapterSource = str | Reference | PullResult | Path | LoadedAdapter


def source_label(source: AdapterSource) -> str:
    """How a source is named in events and errors."""
    if isinstance(source, LoadedAdapter):
        return source.source
    if isinstance(source, PullResult):
        return str(source.reference)
    return str(source)


def _parse_reference(source: str) -> Reference:
    """A string that is no local directory must be a registry reference: say which failed."""
    try:
        return Reference.parse(source)
    except InvalidReference as exc:
        raise SwapError(
            f"{source!r} is neither an existing local directory nor a registry reference "
            f"({exc}); pass a Path for a directory, or 'repository:tag' / "
            "'repository@sha256:...' for the registry"
        ) from None


class AdapterLoader:
    """Loads sources for one host: `cache` first; `pin` puts misses in page-locked memory."""

    def __init__(self, cache: AdapterCache, *, client: Client | None, pin: bool) -> None:
        self.cache = cache
        self.client = client
        self.pin = pin

    def load(self, source: AdapterSource, client: Client | None) -> tuple[LoadedAdapter, bool]:
        """(the adapter, whether it came from the cache); nothing is inserted."""
        if isinstance(source, LoadedAdapter):
            hit = self.cache.get(source.digest)
            return (hit, True) if hit is not None else (self._ready(source), False)
        if isinstance(source, PullResult):
            hit = self.cache.get(str(source.digest))
            if hit is not None:
                return hit, True
            return self._ready(adapter_from_pull(source)), False
        if isinstance(source, Path):
            local = inspect_directory(source)
            hit = self.cache.get(local.digest)
            if hit is not None:
                return hit, True
            return self._ready(adapter_from_local(local)), False
        if isinstance(source, str) and Path(source).is_dir():
            return self.load(Path(source), client)
        return self._load_reference(source, client or self.client)

    def _load_reference(
        self, source: str | Reference, registry: Client | None
    ) -> tuple[LoadedAdapter, bool]:
        reference = source if isinstance(source, Reference) else _parse_reference(source)
        digest = reference.digest
        if digest is None:
            if registry is None:
                raise HostError(f"loading {reference} needs a Client (AdapterHost(client=...))")
            digest = registry.resolve(reference)
        hit = self.cache.get(str(digest))
        if hit is not None:
            return hit, True
        if registry is None:
            raise HostError(f"{reference} is not cached and no Client was given to pull it")
        result = registry.pull(Reference(reference.repository, digest=digest))
        return self._ready(adapter_from_pull(result, source=str(reference))), False

    def _ready(self, adapter: LoadedAdapter) -> LoadedAdapter:
        """Page-locked when the host stages into a GPU (asynchronous copies)."""
        if not self.pin:
            return adapter
        tensors = [f.a for f in adapter.factors.values()]
        if adapter.prompt is not None:
            tensors.append(adapter.prompt)
        if tensors and not tensors[0].is_pinned():
            return adapter.pin_memory()
        return adapter
