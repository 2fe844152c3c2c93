"""`BatchRows`: which slot each row of the batch in the model reads (the hooks' one input)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BatchRows:
    """The per-row slot index of the batch running now; `base` is the all-zero slot.

    The host replaces `modules` (a new (batch,) int64 tensor on the slots'
    device) under its batch lock before each forward; the stacked slots' hooks
    read it. A compiled graph takes it as an input: a new mix of adapters is a
    new value of the same shape, not a recompile.
    """

    base: int
    device: torch.device
    modules: torch.Tensor

    @classmethod
    def empty(cls, base: int, device: torch.device) -> BatchRows:
        return cls(base, device, torch.full((1,), base, dtype=torch.int64, device=device))

    def base_only(self, batch: int) -> torch.Tensor:
        """Every row on the base model."""
        return torch.full((batch,), self.base, dtype=torch.int64, device=self.device)
