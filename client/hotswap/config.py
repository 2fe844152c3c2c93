"""`HostConfig`: what an `AdapterHost` reserves when it is attached to a model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from peftreg.hotswap.errors import HostError

SwapMode = Literal["unmerged", "merged"]
BaseCheck = Literal["fingerprint", "structure", "shapes"]
ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class HostConfig:
    """How a host is attached.

    - `targets`: module names (a name matches a module path equal to it or
      ending in `.name`, as PEFT's `target_modules` list), a regular
      expression string (`re.fullmatch` on the module path), or
      `"all-linear"` (every linear layer but the output layer).
    - `max_rank`: the largest rank accepted; every slot holds factors up to it, smaller ranks
      zero-padded, so any rank up to it swaps in without reallocation.
    - `device`, `dtype`: of the slots' buffers; default: each target
      module's weight's.
    - `mode`: "unmerged" (default: the adapter runs beside the frozen
      weights, a swap copies factors into preallocated buffers) or "merged"
      (the adapter is merged into the weights, restored bitwise from a
      pristine copy on every swap and unload).
    - `dora`: reserve DoRA row factors (unmerged); False gives a leaner
      forward and refuses DoRA adapters.
    - `ia3`: reserve IA3 scale vectors on the linear targets (unmerged): each
      target's input and output are multiplied by them (ones unless an IA3
      adapter is active); False gives a leaner forward and refuses IA3
      adapters in unmerged mode.
    - `max_virtual_tokens`: > 0 reserves a soft-prompt slot of that many
      virtual tokens, always prepended (unused ones masked out); it serves
      prompt tuning, p-tuning and multitask prompt tuning (one task at a
      time: `AdapterHost.swap(..., task_id=)`).
    - `verify_base`: which identity of the base model an adapter that
      records one must match: "fingerprint" (content; computed at attach
      unless `base_fingerprint` is given), "structure" (tensor names, dtypes
      and shapes) or "shapes" (only each target module's shape, always checked).
    - `pristine_device`: merged mode: where the pristine copy of the target
      weights is kept (default: next to the weights, for the fastest restore).
    - `cache_entries`, `cache_bytes`: the in-memory LRU of loaded adapters
      (CPU), when the host creates its own.
    """

    targets: str | Sequence[str] = ALL_LINEAR
    max_rank: int = 16
    device: torch.device | str | None = None
    dtype: torch.dtype | None = None
    mode: SwapMode = "unmerged"
    dora: bool = True
    ia3: bool = True
    max_virtual_tokens: int = 0
    verify_base: BaseCheck = "structure"
    base_fingerprint: str | None = None
    base_structure_hash: str | None = None
    pristine_device: torch.device | str | None = None
    cache_entries: int = 8
    cache_bytes: int = 2 << 30

    def __post_init__(self) -> None:
        if self.max_rank < 1:
            raise HostError(f"max_rank must be at least 1, not {self.max_rank}")
        if self.max_virtual_tokens < 0:
            raise HostError(f"max_virtual_tokens must be >= 0, not {self.max_virtual_tokens}")
        if self.mode not in ("unmerged", "merged"):
            raise HostError(f"mode must be 'unmerged' or 'merged', not {self.mode!r}")
        if self.verify_base not in ("fingerprint", "structure", "shapes"):
            raise HostError(
                f"verify_base must be 'fingerprint', 'structure' or 'shapes', not "
                f"{self.verify_base!r}"
            )
        if self.dtype is not None and not self.dtype.is_floating_point:
            raise HostError(f"dtype must be a floating point type, not {self.dtype}")
        if self.cache_entries < 1 or self.cache_bytes < 1:
            raise HostError("cache_entries and cache_bytes must be positive")
