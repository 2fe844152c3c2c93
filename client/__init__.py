"""peftreg library: manifests, digests, formats, SDK and CLI shared with the service.

`from peftreg import Client` gives the SDK's client; it is imported lazily so
that the service, which shares this package, does not load it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peftreg.sdk.client import Client

__all__ = ["Client"]


def __getattr__(name: str) -> Any:
    if name == "Client":
        from peftreg.sdk.client import Client

        return Client
    raise AttributeError(f"module 'peftreg' has no attribute {name!r}")
