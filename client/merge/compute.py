"""Each planned base tensor read, merged in fp32, cast once, encoded and handed to the writer.

On the CPU a merged weight is computed in blocks of rows (`BLOCK_ELEMENTS`
fp32 values, cache-sized): a row of the merged weight depends only on the
same row of the base and of the factors (for DoRA too: its norm is per
output row), so each block calls `merged_weight` on row-sliced factors and
its result, cast, overwrites the block's rows in the read buffer (or goes to
a reusable output buffer when the output dtype has another element size).
No fp32 copy of the whole tensor is made and nothing is allocated per
tensor, so no fresh memory is faulted in. Where rows are not
independent (DoRA on a Conv1D or embedding weight), where the weight is
NF4 round-tripped or replaced, on CUDA, or where the encoder transforms the
tensor (not `TensorPlan.as_is`), the whole tensor is computed in fp32 on the
device instead, then cast or encoded.

This library never changes torch's thread settings (they are process-wide
and merges may run on several threads of one process); a caller that owns
its process may (`peftreg merge` runs the plain merge on one intra-op
thread, see `peftreg.cli.merge`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from peftreg.adapters.factors import ModuleFactors, merged_bias, merged_weight
from peftreg.checkpoint.encoding import TensorEncoder
from peftreg.checkpoint.writer import CheckpointWriter
from peftreg.merge.base_checkpoint import BaseCheckpoint
from peftreg.merge.errors import MergeError
from peftreg.merge.nf4 import nf4_round_trip
from peftreg.merge.plan import TensorPlan

BLOCK_ELEMENTS = 1 << 20


def row_factors(factors: ModuleFactors, start: int, stop: int) -> ModuleFactors:
    """The factors of rows start:stop of the stored weight (its first dimension)."""
    if factors.layer == "linear":  # stored (out, in): rows are B's rows
        magnitude = None if factors.magnitude is None else factors.magnitude[start:stop]
        return replace(factors, b=factors.b[start:stop], magnitude=magnitude)
    # Conv1D (in, out) and embedding (num_embeddings, dim) store delta.T: rows are A's columns.
    if factors.magnitude is not None:
        raise MergeError(f"{factors.module}: DoRA on a {factors.layer} weight merges whole")
    return replace(factors, a=factors.a[:, start:stop])


def row_blockable(plan: TensorPlan) -> bool:
    return (
        bool(plan.weight)
        and not plan.nf4
        and plan.replacement is None
        and len(plan.source.shape) == 2
        and all(f.layer == "linear" or f.magnitude is None for f, _ in plan.weight)
        and all(f.mora_type is None for f, _ in plan.weight)  # MoRA's delta is made whole
    )


def check_unchanged(plan: TensorPlan, value: torch.Tensor) -> None:
    """Full tensors of summed adapters must be copies of the base's (PEFT saves them)."""
    for label, copy in plan.unchanged:
        if not torch.equal(copy.to(value.dtype), value):
            raise MergeError(
                f"{label} replaces {plan.source.name} with a new full weight (modules_to_save or "
                "a trained embedding); full weights cannot be summed with other adapters"
            )


def merged_fp32(
    plan: TensorPlan,
    value: torch.Tensor,
    device: torch.device,
    read: Callable[[str], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The tensor's merged values, fp32 on `device`, computed whole. `read` gives the
    module's other base tensors to peft's layer merge (`TensorPlan.peft`)."""
    if plan.peft is not None:
        modules, module = plan.peft
        assert read is not None
        return modules.merged(module, plan.source.name, read).to(device)
    check_unchanged(plan, value)
    if plan.replacement is not None:
        value = plan.replacement
    elif plan.nf4:
        source = value.to(device)
        if plan.nf4_transposed:  # Conv1D: bitsandbytes quantizes the (out, in) transpose
            value = nf4_round_trip(source.T.contiguous()).T
        else:
            value = nf4_round_trip(source)
        del source
    if plan.weight:
        return merged_weight(value, plan.weight, device)
    if plan.bias:
        result = merged_bias(value, plan.bias, device)
        assert result is not None
        return result
    return value.to(device, torch.float32)


class TensorMerger:
    """Writes planned tensors, one at a time, through a reusable CPU output buffer."""

    def __init__(
        self,
        checkpoint: BaseCheckpoint,
        writer: CheckpointWriter,
        encoder: TensorEncoder,
        device: torch.device,
    ) -> None:
        self.checkpoint = checkpoint
        self.writer = writer
        self.encoder = encoder
        self.device = device
        self._buffer = torch.empty(0, dtype=torch.uint8)

    @property
    def buffer_bytes(self) -> int:
        return self._buffer.numel()

    def write(self, plan: TensorPlan) -> None:
        source = plan.source
        if plan.mode == "copy":
            self.writer.write_raw(source.name, self.checkpoint.chunks(source))
            return
        value = self.checkpoint.read(source)
        if plan.mode == "cast":
            out = self._output(source.shape, plan.out_dtype)
            out.copy_(value)
            del value
            self.writer.write(source.name, out)
            return
        if plan.as_is and self.device.type == "cpu" and row_blockable(plan):
            # Each block is copied to fp32 before its rows are overwritten, so the merged
            # rows can go back into the read buffer when the element sizes agree.
            if value.element_size() == plan.out_dtype.itemsize:
                out = value.view(plan.out_dtype)
            else:
                out = self._output(source.shape, plan.out_dtype)
            self._merge_rows(plan, value, out)
            del value
            self.writer.write(source.name, out)
            return
        merged = merged_fp32(plan, value, self.device, self._read)
        del value
        if plan.as_is:
            out = self._output(source.shape, plan.out_dtype)
            out.copy_(merged.to(plan.out_dtype))
            del merged
            self.writer.write(source.name, out)
            return
        encoded = self.encoder.encode(source.name, merged, plan.out_dtype)
        del merged
        expected = [p.name for p in plan.outputs]
        if sorted(encoded) != sorted(expected):
            raise MergeError(
                f"{source.name}: the encoder planned {expected} but returned {sorted(encoded)}"
            )
        for output in plan.outputs:
            self.writer.write(output.name, encoded.pop(output.name).to("cpu"))

    def _read(self, name: str) -> torch.Tensor:
        return self.checkpoint.read(self.checkpoint.by_name[name])

    def _merge_rows(self, plan: TensorPlan, value: torch.Tensor, out: torch.Tensor) -> None:
        check_unchanged(plan, value)
        rows, columns = value.shape
        step = max(1, BLOCK_ELEMENTS // max(1, columns))
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            parts = [(row_factors(f, start, stop), mix) for f, mix in plan.weight]
            out[start:stop].copy_(merged_weight(value[start:stop], parts, self.device))

    def _output(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A view of the reusable output buffer with this shape and dtype."""
        count = 1
        for size in shape:
            count *= size
        nbytes = count * dtype.itemsize
        if self._buffer.numel() < nbytes:
            self._buffer = torch.empty(0, dtype=torch.uint8)  # release before growing
            self._buffer = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        return self._buffer[:nbytes].view(dtype).view(shape)
