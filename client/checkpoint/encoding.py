"""How each output tensor of a checkpoint is stored: the seam between merge and quantize.

A streaming checkpoint writer must know every output tensor's name, dtype and
shape before it reads any data, so that shard headers can be written first.
An encoder therefore answers twice for each base tensor: `plan` (from the
name, shape and dtype alone) and `encode` (with the fp32 values), and the two
must agree exactly.

A plan of exactly `[PlannedTensor(name, dtype, shape)]` (the input's own name
and shape, in the output dtype) means "stored as it is, cast to `dtype`": the
merge then streams such a tensor (copied or cast block by block, or merged in
row blocks) and does not call `encode` for it. An encoder that changes values
must therefore rename them, change their shape or dtype, or split them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize


def stored_as_is(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, planned: Sequence[PlannedTensor]
) -> bool:
    """Whether an encoder's plan for (name, shape) stores the tensor as it is, cast to `dtype`
    (see the module doc): then its values never go through `encode`."""
    return list(planned) == [PlannedTensor(name, dtype, tuple(shape))]


class TensorEncoder(Protocol):
    """Turns one (merged) fp32 tensor into the tensors stored for it."""

    def plan(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> list[PlannedTensor]:
        """The tensors `encode` will return for this input, in order; `dtype` is the output's.

        Called once per input tensor of a checkpoint, in order, then `config_update`."""
        ...

    def encode(
        self, name: str, tensor: torch.Tensor, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        """The stored tensors, exactly as planned (names, dtypes, shapes), on any device."""
        ...

    def config_update(self) -> dict[str, Any]:
        """Keys merged into the output's config.json (e.g. `quantization_config`)."""
        ...

    def recipe(self) -> dict[str, Any]:
        """Parameters recorded in the checkpoint's provenance."""
        ...


class CastEncoder:
    """Stores each tensor as it is, cast to the output dtype (float tensors only)."""

    def plan(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> list[PlannedTensor]:
        return [PlannedTensor(name, dtype, shape)]

    def encode(
        self, name: str, tensor: torch.Tensor, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        return {name: tensor.to(dtype)}

    def config_update(self) -> dict[str, Any]:
        return {}

    def recipe(self) -> dict[str, Any]:
        return {"quantization": "none"}
