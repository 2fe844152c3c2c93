"""Hot-swap: adapter slots attached to a live `torch.nn.Module`.

`AdapterHost` serves LoRA, rsLoRA, DoRA, NOLA, IA3, prompt-tuning, p-tuning
and multitask prompt-tuning adapters (merged mode: also the other types peft
merges) on a model that stays in memory: swaps are atomic (staged, validated, then one
flip that forward passes in other threads never straddle), verified (base
identity, shapes, finite values, NOLA digests), free of recompiles under
`torch.compile`, cached in a CPU LRU, and can follow a registry tag.
"""

from __future__ import annotations

from peftreg.hotswap.adapter import LoadedAdapter, adapter_from_directory, adapter_from_pull
from peftreg.hotswap.base import module_fingerprint
from peftreg.hotswap.cache import AdapterCache
from peftreg.hotswap.config import HostConfig
from peftreg.hotswap.errors import (
    AdapterDigestMismatch,
    AdapterShapeMismatch,
    BaseMismatch,
    FlipTimeout,
    HostError,
    InputNotSupported,
    NonFiniteAdapter,
    RankTooLarge,
    SwapError,
    TagMissing,
    TooManyVirtualTokens,
    UnsupportedAdapter,
)
from peftreg.hotswap.events import SwapEvent, SwapFailure
from peftreg.hotswap.follow import TagFollower
from peftreg.hotswap.host import AdapterHost

__all__ = [
    "AdapterCache",
    "AdapterDigestMismatch",
    "AdapterHost",
    "AdapterShapeMismatch",
    "BaseMismatch",
    "FlipTimeout",
    "HostConfig",
    "HostError",
    "InputNotSupported",
    "LoadedAdapter",
    "NonFiniteAdapter",
    "RankTooLarge",
    "SwapError",
    "SwapEvent",
    "SwapFailure",
    "TagFollower",
    "TagMissing",
    "TooManyVirtualTokens",
    "UnsupportedAdapter",
    "adapter_from_directory",
    "adapter_from_pull",
    "module_fingerprint",
]
