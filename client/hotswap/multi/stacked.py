"""A stacked slot: the low-rank factors of K resident adapters beside one frozen layer.

Buffers are allocated once, for K adapter slots plus one all-zero slot (index
K) that base-only rows point at:

    a        (K+1, R, in)    embedding: (K+1, num_embeddings, R), A transposed for the lookup
    b        (K+1, out, R)   gain * B, gain = scaling * row (times a scaled embedding's scale)
    lora_bias (K+1, out)     gain * lora_bias
    row_m1   (K+1, out)      DoRA row factor - 1 (absent on a host without DoRA)

A forward hook reads the batch's per-row slot index `rows` (batch,) and adds,
for every row at once, with gathered batched matmuls (no loop over adapters):

    y + x @ A[rows]^T @ b[rows]^T + lora_bias[rows] + row_m1[rows] * (y - bias)

and, on a host with IA3 scales (linear and Conv1D layers), each row's input
times scale_in[rows] (a forward pre-hook) and its output y times
scale_out[rows] (ones for every slot but an IA3 adapter's, the base slot
included): `peftreg.hotswap.slots.ModuleSlot`'s update with each row's own
adapter, the per-output-row gain folded into B and the bias when the adapter
is written (two fewer gathers and products per layer and forward). Writing
an adapter into slot j copies into the slices of j (zero-padding ranks below
R); it never reallocates, so a compiled graph, which takes these tensors as
inputs, is never invalidated, and forwards that read other slots are never
disturbed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from peftreg.adapters.factors import ModuleFactors
from peftreg.adapters.ia3 import Ia3Scale
from peftreg.hotswap.adapter import largest
from peftreg.hotswap.multi.rows import BatchRows
from peftreg.hotswap.planning import check_fits
from peftreg.hotswap.slots import copy_into, fill, output_scale
from peftreg.hotswap.targets import TargetSite


class StackedSlot:
    """The K+1 stacked slots of one target module; see the module docstring."""

    def __init__(
        self,
        site: TargetSite,
        rows: BatchRows,
        count: int,
        max_rank: int,
        device: torch.device,
        dtype: torch.dtype,
        *,
        dora: bool,
        ia3: bool = False,
    ) -> None:
        self.site = site
        self.rows = rows
        self.count = count
        self.max_rank = max_rank
        self.device = device
        self.dtype = dtype
        self.output_scale = output_scale(site)
        self.embedding = site.layer == "embedding"
        slots, rank = count + 1, max_rank

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, device=device, dtype=dtype)

        if self.embedding:
            self.a = zeros(slots, site.in_features, rank)
        else:
            self.a = zeros(slots, rank, site.in_features)
        self.b = zeros(slots, site.out_features, rank)
        self.lora_bias = zeros(slots, site.out_features)
        self.row_m1: torch.Tensor | None = zeros(slots, site.out_features) if dora else None
        self.ia3 = ia3 and not self.embedding  # peft's IA3 has no embedding layer
        self.scales: dict[str, torch.Tensor] = {}  # IA3: scale_in (K+1, in), scale_out (K+1, out)
        if self.ia3:
            for name, size in (("scale_in", site.in_features), ("scale_out", site.out_features)):
                self.scales[name] = torch.ones(slots, size, device=device, dtype=dtype)
        self.scaled = [False] * slots  # the slot's IA3 scales may differ from ones
        self.ranks = [0] * slots  # leading rank positions that may be non-zero, per slot
        self.biased = [False] * slots  # lora_bias of the slot may be non-zero
        self._handles: list[RemovableHandle] = []

    @property
    def name(self) -> str:
        return self.site.name

    def tensors(self) -> list[torch.Tensor]:
        items = [self.a, self.b, self.lora_bias]
        items += [self.row_m1] if self.row_m1 is not None else []
        return items + list(self.scales.values())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    # forward ------------------------------------------------------------------

    def attach(self) -> None:
        module = self.site.module
        if self.ia3:
            self._handles.append(module.register_forward_pre_hook(self.pre_hook))
        self._handles.append(module.register_forward_hook(self.hook))

    def detach(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def _per_row(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """Each row's IA3 scale, shaped to broadcast over `like` (batch, ..., features)."""
        rows = self.rows.modules
        scale = self.scales[name].index_select(0, rows)
        return scale.reshape((int(rows.shape[0]),) + (1,) * (like.ndim - 2) + (-1,))

    def pre_hook(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
        """IA3: each row's input times its slot's scale_in."""
        x = args[0]
        return ((x * self._per_row("scale_in", x)).to(x.dtype), *args[1:])

    def hook(
        self, module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor:
        rows = self.rows.modules
        x = args[0]
        batch = int(x.shape[0])
        if self.embedding:
            index = rows.reshape((batch,) + (1,) * (x.ndim - 1))
            hidden = self.a[index, x].reshape(batch, -1, self.max_rank)  # (batch, L, R)
        else:
            a = self.a.index_select(0, rows)  # (batch, R, in)
            flat = x.reshape(batch, -1, x.shape[-1]).to(self.dtype)
            hidden = torch.bmm(flat, a.transpose(1, 2))
        b = self.b.index_select(0, rows)  # (batch, out, R)
        delta = torch.baddbmm(
            self.lora_bias.index_select(0, rows).unsqueeze(1), hidden, b.transpose(1, 2)
        )
        if self.row_m1 is not None:
            bias = self.site.bias
            base = output if bias is None else output - bias
            flat_base = base.reshape(batch, -1, base.shape[-1]).to(self.dtype)
            delta = delta + self.row_m1.index_select(0, rows).unsqueeze(1) * flat_base
        delta = delta.reshape(output.shape).to(output.dtype)
        if self.ia3:  # y * scale_out + delta, one kernel
            return torch.addcmul(delta, output, self._per_row("scale_out", output).to(output.dtype))
        return output + delta

    # loading ------------------------------------------------------------------

    def write(
        self,
        slot: int,
        factors: ModuleFactors | None,
        row: torch.Tensor | None,
        ia3: Ia3Scale | None = None,
    ) -> int:
        """Copy `factors` (None: nothing, the slot contributes zero) into slot `slot`;
        `row` is the DoRA row factor m / norm (fp32 on the device) or None, `ia3` the
        module's IA3 vector (None: scales of one); bytes written.

        B and the bias are written times their gain (checked to fit the slot's dtype).
        Only the slot's own slices are written; call it for a slot no batch reads.
        """
        written = 0
        rank = 0 if factors is None else factors.rank
        a = self.a[slot].T if self.embedding else self.a[slot]  # (R, in)
        b = self.b[slot]
        previous = self.ranks[slot]
        self.ranks[slot] = self.max_rank  # unknown until the copies are done
        bias = None
        if factors is not None:
            gain = self._gain(factors.scaling, row)
            scaled = factors.b.to(gain.device) * gain.unsqueeze(1)
            check_fits(f"{self.name} lora_B * scaling", largest(scaled), self.dtype)
            written += copy_into(a[:rank], factors.a)
            written += copy_into(b[:, :rank], scaled.to(self.dtype))
            if factors.bias is not None:
                bias = factors.bias.to(gain.device) * gain
        if previous > rank:
            written += fill(a[rank:previous], 0.0)
            written += fill(b[:, rank:previous], 0.0)
        if bias is not None:
            written += copy_into(self.lora_bias[slot], bias.to(self.dtype))
            self.biased[slot] = True
        elif self.biased[slot]:
            written += fill(self.lora_bias[slot], 0.0)
            self.biased[slot] = False
        if self.row_m1 is not None:
            if row is None:
                written += fill(self.row_m1[slot], 0.0)
            else:
                written += copy_into(self.row_m1[slot], (row - 1.0).to(self.dtype))
        if self.ia3:
            written += self._write_scales(slot, ia3)
        self.ranks[slot] = rank
        return written

    def _write_scales(self, slot: int, ia3: Ia3Scale | None) -> int:
        """The IA3 vector into its scale of `slot`, ones into the other (skipped where
        the slot is known to hold ones)."""
        written = 0
        scaled = None if ia3 is None else "scale_in" if ia3.feedforward else "scale_out"
        was_scaled, self.scaled[slot] = self.scaled[slot], True  # unknown until done
        for name, tensor in self.scales.items():
            if name == scaled:
                assert ia3 is not None
                written += copy_into(tensor[slot], ia3.vector)
            elif was_scaled:
                written += fill(tensor[slot], 1.0)
        self.scaled[slot] = ia3 is not None
        return written

    def _gain(self, scaling: float, row: torch.Tensor | None) -> torch.Tensor:
        """scaling (times the output scale, times the DoRA row factor) per output row, fp32."""
        scaling *= self.output_scale
        if row is None:
            return torch.full((self.site.out_features,), scaling, dtype=torch.float32)
        return row.to(torch.float32) * scaling
