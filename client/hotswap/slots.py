"""A module slot: double-buffered low-rank factors beside one frozen layer (unmerged mode).

Each slot holds two `SlotBuffers` (active and spare) of the host's maximum
rank, allocated once at attach. A forward hook adds, to the layer's output y,

    y + gain * (B @ A @ x + lora_bias) + (row - 1) * (y - base_bias)

with gain = scaling * row (times the layer's `embed_scale` for a scaled
embedding such as Gemma 3's, which PEFT applies to the adapter's output
too). For LoRA, rsLoRA and NOLA row is 1 (the last term is exactly zero);
for DoRA row = m / ||W + scaling * B @ A|| per output row, computed once
per swap (`peftreg.adapters.factors.dora_row_scale`), which is PEFT's
unmerged DoRA forward. A module the adapter does not target has
B = 0 and gain = 0 and contributes exactly zero; a rank r below the maximum
fills the first r rows of A and columns of B and the rest are zero.

IA3 (a host attached with `ia3=True`; linear and Conv1D layers): two more
vectors, of ones unless an IA3 adapter is active, scale the layer's input
(a forward pre-hook, x * scale_in: peft's feedforward modules) and its
output (y * scale_out + the update above, which is zero for an IA3
adapter), as peft's unmerged IA3 forward does. A scale of one is exact, so
a host with no IA3 adapter computes what it computes without the vectors.

A swap stages the new factors into the spare buffers (forwards keep reading
the active ones), then `flip` exchanges the two sets' tensor references. An
adapter whose factors already have the buffers' exact shape, dtype, device
and strides needs no staging: `show` makes a resident set active, one made of
the adapter's own tensors (`peftreg.hotswap.resident`), never written. The
compiled graph takes these tensors as inputs (dynamo guards their dtype,
shape and strides, which never change), so swaps do not recompile.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils.hooks import RemovableHandle

from peftreg.adapters.factors import ModuleFactors
from peftreg.adapters.ia3 import Ia3Scale
from peftreg.hotswap.errors import HostError
from peftreg.hotswap.targets import TargetSite

Region = tuple[slice, ...]
ALL: Region = (slice(None),)
_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16)


def numpy_view(tensor: torch.Tensor) -> np.ndarray | None:
    """A numpy array sharing `tensor`'s memory, when it is a CPU tensor numpy can hold."""
    if tensor.device.type == "cpu" and tensor.dtype in _NUMPY_DTYPES:
        return tensor.detach().numpy()
    return None


def copy_into(target: torch.Tensor, source: torch.Tensor) -> int:
    """target[...] = source; bytes written.

    CPU to CPU in one dtype is a numpy copy: single-threaded, no per-op
    dispatch, and no contention with forward passes for torch's intra-op
    threads. Anything else is `copy_` (asynchronous from pinned memory).
    """
    array = numpy_view(target)
    if array is not None and source.device.type == "cpu" and source.dtype == target.dtype:
        array[...] = source.detach().numpy()
    else:
        target.copy_(source, non_blocking=True)
    return target.numel() * target.element_size()


def fill(target: torch.Tensor, value: float) -> int:
    """target[...] = value (numpy on the CPU, as `copy_into`); bytes written."""
    array = numpy_view(target)
    if array is not None:
        array.fill(value)
    else:
        target.fill_(value)
    return target.numel() * target.element_size()


@dataclass
class SlotBuffers:
    """One set of a slot's tensors; `rank` leading positions may be non-zero.

    `arrays` holds numpy views of the tensors on the CPU, made once, so that
    staging slices arrays instead of building tensor views per swap.
    """

    a: torch.Tensor  # (R, in); embedding: (num_embeddings, R), A transposed for the lookup
    b: torch.Tensor  # (out, R)
    lora_bias: torch.Tensor  # (out,)
    gain: torch.Tensor  # (out,) scaling * row
    row_m1: torch.Tensor | None  # (out,) DoRA row factor - 1; None on a host without DoRA
    scale_in: torch.Tensor | None = None  # (in,) IA3 input scale; None: no IA3 on the slot
    scale_out: torch.Tensor | None = None  # (out,) IA3 output scale
    transposed_a: bool = False  # `a` holds A transposed (embedding)
    rank: int = 0
    clean: bool = True  # False: contents unknown (a stage failed half-way)
    bias_zero: bool = True  # lora_bias is all zeros
    row_zero: bool = True  # row_m1 is all zeros (or absent)
    unit: dict[str, bool] = field(default_factory=dict)  # scale_in / scale_out all ones
    gain_fill: float | None = 0.0  # the one value gain holds throughout (None: per-row values)
    index: int = 0  # which of the slot's two sets (staging programs are kept per set)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    resident: bool = False  # an adapter's own tensors (and shared constants): never written

    def __post_init__(self) -> None:
        if self.resident:
            return  # never staged into: no arrays to write through
        views = {name: numpy_view(tensor) for name, tensor in self.fields().items()}
        self.arrays = {name: view for name, view in views.items() if view is not None}

    def with_factors(
        self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None
    ) -> SlotBuffers:
        """This resident set with the factors (and bias, when it has one) of another adapter
        of the same layout: the same shapes, strides, dtype, rank and gain. A copy of the
        attributes (no `__init__`: a cold swap makes one per module)."""
        assert self.resident, "only a resident set is a template"
        other = object.__new__(SlotBuffers)
        other.__dict__.update(self.__dict__)
        other.a, other.b = a, b
        if bias is not None:
            other.lora_bias = bias
        return other

    def fields(self) -> dict[str, torch.Tensor]:
        """The writable tensors by name; "a" as (R, in) whatever the layout."""
        items = {
            "a": self.a.T if self.transposed_a else self.a,
            "b": self.b,
            "lora_bias": self.lora_bias,
            "gain": self.gain,
        }
        if self.row_m1 is not None:
            items["row_m1"] = self.row_m1
        if self.scale_in is not None and self.scale_out is not None:
            items["scale_in"], items["scale_out"] = self.scale_in, self.scale_out
        return items

    def tensors(self) -> list[torch.Tensor]:
        items = [self.a, self.b, self.lora_bias, self.gain]
        optional = (self.row_m1, self.scale_in, self.scale_out)
        return items + [t for t in optional if t is not None]

    def put(self, name: str, region: Region, source: torch.Tensor) -> int:
        """buffer[name][region] = source; bytes written."""
        array = self.arrays.get(name)
        values = None if array is None else numpy_view(source)
        if array is not None and values is not None and values.dtype == array.dtype:
            target = array[region]
            target[...] = values
            return int(target.nbytes)
        return copy_into(self.fields()[name][region], source)

    def clear(self, name: str, region: Region, value: float = 0.0) -> int:
        """buffer[name][region] = value; bytes written."""
        array = self.arrays.get(name)
        if array is not None:
            target = array[region]
            target.fill(value)
            return int(target.nbytes)
        return fill(self.fields()[name][region], value)


class ModuleSlot:
    """The slot of one target module; see the module docstring for the math."""

    def __init__(
        self,
        site: TargetSite,
        max_rank: int,
        device: torch.device,
        dtype: torch.dtype,
        *,
        dora: bool,
        ia3: bool = False,
    ) -> None:
        self.site = site
        self.max_rank = max_rank
        self.device = device
        self.dtype = dtype
        self.output_scale = output_scale(site)
        self.ia3 = ia3 and site.layer != "embedding"  # peft's IA3 has no embedding layer
        self.active = self._allocate(dora, 0)
        self.spare = self._allocate(dora, 1)
        self.own = (self.active, self.spare)  # the two sets allocated at attach
        self._handles: list[RemovableHandle] = []

    @property
    def name(self) -> str:
        return self.site.name

    def _allocate(self, dora: bool, index: int) -> SlotBuffers:
        site, rank = self.site, self.max_rank
        embedding = site.layer == "embedding"
        shape_a = (site.in_features, rank) if embedding else (rank, site.in_features)

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, device=self.device, dtype=self.dtype)

        def ones(size: int) -> torch.Tensor | None:
            return torch.ones(size, device=self.device, dtype=self.dtype) if self.ia3 else None

        return SlotBuffers(
            a=zeros(*shape_a),
            b=zeros(site.out_features, rank),
            lora_bias=zeros(site.out_features),
            gain=zeros(site.out_features),
            row_m1=zeros(site.out_features) if dora else None,
            scale_in=ones(site.in_features),
            scale_out=ones(site.out_features),
            transposed_a=embedding,
            unit={"scale_in": True, "scale_out": True},
            index=index,
        )

    def nbytes(self) -> int:
        """Device bytes of both buffer sets allocated at attach."""
        tensors = self.own[0].tensors() + self.own[1].tensors()
        return sum(t.numel() * t.element_size() for t in tensors)

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

    def pre_hook(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
        """IA3: the input times scale_in (ones unless an IA3 adapter scales it)."""
        scale = self.active.scale_in
        assert scale is not None
        x = args[0]
        return ((x * scale).to(x.dtype), *args[1:])

    def hook(
        self, module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor:
        buffers = self.active
        x = args[0]
        if self.site.layer == "embedding":
            hidden = F.embedding(x, buffers.a)
        else:
            hidden = F.linear(x.to(buffers.a.dtype), buffers.a)
        delta = buffers.gain * F.linear(hidden, buffers.b, buffers.lora_bias)
        if buffers.row_m1 is not None:
            bias = self.site.bias
            base = output if bias is None else output - bias
            delta = delta + buffers.row_m1 * base
        if buffers.scale_out is not None:  # IA3: y * scale_out + delta, one kernel
            scale = buffers.scale_out.to(output.dtype)
            return torch.addcmul(delta.to(output.dtype), output, scale)
        return output + delta.to(output.dtype)

    # swap ---------------------------------------------------------------------

    def stage(
        self,
        factors: ModuleFactors | None,
        row: torch.Tensor | None,
        ia3: Ia3Scale | None = None,
        *,
        copy_factors: bool = True,
    ) -> int:
        """Write `factors` (None: nothing) into the spare buffers; bytes written.

        `row` is the DoRA row factor (m / norm), fp32 on the device, or None;
        `ia3` the module's IA3 vector (None: the scales are ones).
        With `copy_factors=False` the caller copies A into the first `rank`
        rows and B into the first `rank` columns itself (a staging program,
        `peftreg.hotswap.staging`); everything else is written here.
        """
        spare = self.spare
        clean = spare.clean
        previous = spare.rank if clean else self.max_rank
        spare.clean = False
        written = 0
        rank = 0 if factors is None else factors.rank
        if factors is not None and copy_factors:
            written += spare.put("a", (slice(0, rank),), factors.a)
            written += spare.put("b", (slice(None), slice(0, rank)), factors.b)
        if previous > rank:
            written += spare.clear("a", (slice(rank, previous),))
            written += spare.clear("b", (slice(None), slice(rank, previous)))
        if factors is not None and factors.bias is not None:
            written += spare.put("lora_bias", ALL, factors.bias)
            spare.bias_zero = False
        elif not (clean and spare.bias_zero):
            written += spare.clear("lora_bias", ALL)
            spare.bias_zero = True
        scaling = 0.0 if factors is None else factors.scaling * self.output_scale
        if row is None:
            if not (clean and spare.gain_fill == scaling):
                written += spare.clear("gain", ALL, scaling)
                spare.gain_fill = scaling
        else:
            written += spare.put("gain", ALL, (row * scaling).to(self.dtype))
            spare.gain_fill = None
        if spare.row_m1 is not None:
            if row is not None:
                written += spare.put("row_m1", ALL, (row - 1.0).to(self.dtype))
                spare.row_zero = False
            elif not (clean and spare.row_zero):
                written += spare.clear("row_m1", ALL)
                spare.row_zero = True
        if self.ia3:
            written += self._stage_scales(spare, clean, ia3)
        spare.rank = rank
        spare.clean = True
        return written

    @staticmethod
    def _stage_scales(spare: SlotBuffers, clean: bool, ia3: Ia3Scale | None) -> int:
        """The IA3 vector into its scale, ones into the other (skipped where known ones)."""
        written = 0
        scaled = None if ia3 is None else "scale_in" if ia3.feedforward else "scale_out"
        for name in ("scale_in", "scale_out"):
            if name == scaled:
                assert ia3 is not None
                spare.unit[name] = False
                written += spare.put(name, ALL, ia3.vector)
            elif not (clean and spare.unit[name]):
                spare.unit[name] = False
                written += spare.clear(name, ALL, 1.0)
                spare.unit[name] = True
        return written

    def flip(self) -> None:
        """Make the staged buffers active; call only with forwards excluded.

        The set active before becomes the spare, unless it was a resident set
        (never written): the spare is then the other set allocated at attach.
        """
        previous, self.active = self.active, self.spare
        if previous.resident:
            previous = self.own[0] if self.active is self.own[1] else self.own[1]
        self.spare = previous

    def show(self, buffers: SlotBuffers) -> None:
        """Make a resident set active (nothing is written); call only with forwards excluded.
        The spare stays the set it was."""
        assert buffers.resident, "only a resident set is shown; anything else is staged"
        self.active = buffers


def output_scale(site: TargetSite) -> float:
    """The factor a scaled embedding multiplies its lookups by (`embed_scale`), else 1.0."""
    if site.layer != "embedding":
        return 1.0
    scale = getattr(site.module, "embed_scale", None)
    if scale is None:
        return 1.0
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise HostError(
                f"{site.name}: embed_scale has shape {list(scale.shape)}; a scalar is expected"
            )
        return float(scale.item())
    return float(scale)
