"""Typed errors of hot-swap: what was wrong with the host's setup or with an adapter.

Every one is an `InvalidRequest` of the SDK, so callers that already handle
the SDK's errors handle these; registry failures met while fetching an
adapter (not found, unreachable, digest mismatch) keep their own SDK types.
"""

from __future__ import annotations

from peftreg.sdk.errors import InvalidRequest


class HostError(InvalidRequest):
    """A host that cannot be attached as configured (targets, sizes, model)."""


class SwapError(InvalidRequest):
    """An adapter that cannot be swapped in; the previous adapter stays active."""


class UnsupportedAdapter(SwapError):
    """A kind or feature the host does not serve (prefix tuning, modules_to_save, ...)."""


class BaseMismatch(SwapError):
    """The adapter was made for another base model (fingerprint or structure differ)."""


class AdapterShapeMismatch(SwapError):
    """The adapter's tensors do not fit the host's slots (module, shape, rank, tokens)."""


class RankTooLarge(AdapterShapeMismatch):
    """A module's rank is above the host's maximum rank."""


class TooManyVirtualTokens(AdapterShapeMismatch):
    """A soft prompt longer than the host's virtual-token slot."""


class NonFiniteAdapter(SwapError):
    """NaN or infinite values in the adapter's tensors or in what they produce."""


class AdapterDigestMismatch(SwapError):
    """Materialized content that does not hash to the digest the adapter records."""


class InputNotSupported(HostError):
    """A forward call the soft-prompt slot cannot extend (e.g. a 4-d attention mask)."""


class FlipTimeout(SwapError):
    """Forward passes in flight (or a `pinned()` request) did not drain before the flip's
    deadline; the previous adapter stays active."""


class TagMissing(SwapError):
    """The followed tag does not exist (any more); the active adapter stays."""
