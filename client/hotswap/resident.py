"""Resident adapters: a cached adapter served from its own memory, so that a swap to it
copies nothing and is a flip of tensor references.

A module slot's buffers have a fixed layout: A (max_rank, in) and B
(out, max_rank), contiguous, in the slot's dtype on its device. An adapter
read whole from a tensors file holds its factors as contiguous views of one
buffer; when they are of the host's max rank, in the slot's dtype and on its
device (a rank-16 fp32 LoRA on a CPU host of max_rank 16), they already *are*
slot-shaped buffers. The host then serves the adapter in place: a
`resident set` per module is made of the adapter's own A, B (and lora_bias)
and of shared constant vectors (the gain, which is the module's scaling
throughout; zeros for an absent bias or a DoRA row factor; ones for IA3
scales), and a warm swap `show`s these sets under the forward gate, all
modules together, instead of copying bytes into spare buffers.

Invariants:

- A resident set is never written: staging writes only into the two sets a
  slot allocated at attach, and a `LoadedAdapter` is immutable. The constant
  vectors are shared read-only.
- Layout: a set is made resident only when every tensor has the slot
  buffer's exact shape, dtype, device and strides, so a compiled graph (dynamo
  guards these) does not recompile.
- Memory: a resident set shares the adapter's tensors, which the LRU already
  counts in bytes (`AdapterCache`); only the constant vectors are the host's
  own (`ResidentSets.nbytes`, counted in `AdapterHost.nbytes`).
- Lifetime: an active resident set holds the adapter's tensors, and so its
  file buffer (`peftreg.hotswap.tensorfile.BufferPool` hands a buffer out
  again only once nothing refers to it): an entry evicted from the LRU while
  active stays intact until another adapter replaces it.

An adapter of a lower rank, another dtype, a GPU host, DoRA, IA3 or an
embedding target (whose slot holds A transposed) is staged by copy as before.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from peftreg.adapters.factors import ModuleFactors
from peftreg.hotswap.adapter import LoadedAdapter
from peftreg.hotswap.layouts import FactorLayout
from peftreg.hotswap.slots import ModuleSlot, SlotBuffers


class ConstantVectors:
    """Read-only vectors filled with one value, shared by every resident set of a host
    (a gain of `scaling` throughout, zeros, ones), by (size, value)."""

    def __init__(self) -> None:
        self._vectors: dict[tuple[int, float, torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, size: int, value: float, like: torch.Tensor) -> torch.Tensor:
        """A vector of `size` values `value`, in the dtype and on the device of `like`."""
        key = (size, value, like.dtype, like.device)
        vector = self._vectors.get(key)
        if vector is None:
            vector = self._vectors[key] = torch.full(
                (size,), value, dtype=like.dtype, device=like.device
            )
        return vector

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._vectors.values())

    def clear(self) -> None:
        self._vectors.clear()


def _fits(tensor: torch.Tensor | None, buffer: torch.Tensor | None) -> bool:
    """`tensor` can stand in for `buffer`: the same shape, strides, dtype and device."""
    return (
        tensor is not None
        and buffer is not None
        and tensor.dtype == buffer.dtype
        and tensor.shape == buffer.shape
        and tensor.stride() == buffer.stride()
        and tensor.device == buffer.device
    )


def resident_set(
    slot: ModuleSlot, factors: ModuleFactors, vectors: ConstantVectors
) -> SlotBuffers | None:
    """The slot's buffers made of `factors`' own tensors; None when they are not slot-shaped
    (or need more than A, B and a bias: DoRA, MoRA)."""
    layout = slot.spare
    if factors.magnitude is not None or factors.mora_type is not None or layout.transposed_a:
        return None
    if not (_fits(factors.a, layout.a) and _fits(factors.b, layout.b)):
        return None
    bias = factors.bias
    if bias is not None and not _fits(bias, layout.lora_bias):
        return None
    out = layout.gain.shape[0]
    zeros = vectors.get(out, 0.0, layout.gain)
    return SlotBuffers(
        a=factors.a,
        b=factors.b,
        lora_bias=zeros if bias is None else bias,
        gain=vectors.get(out, float(factors.scaling * slot.output_scale), layout.gain),
        row_m1=None if layout.row_m1 is None else zeros,
        scale_in=None
        if layout.scale_in is None
        else vectors.get(layout.scale_in.shape[0], 1.0, layout.gain),
        scale_out=None if layout.scale_out is None else vectors.get(out, 1.0, layout.gain),
        rank=factors.rank,
        bias_zero=bias is None,
        gain_fill=float(factors.scaling * slot.output_scale),
        index=-1,
        resident=True,
    )


def _templates(
    built: dict[str, SlotBuffers] | None, slots: Mapping[str, ModuleSlot]
) -> dict[str, SlotBuffers] | None:
    """The sets of a layout without the adapter's tensors (the slot's own buffers stand in
    for them, so a template keeps no adapter's file buffer alive)."""
    if built is None:
        return None
    templates = {}
    for name, buffers in built.items():
        own = slots[name].own[0]
        bias = None if buffers.bias_zero else own.lora_bias
        templates[name] = buffers.with_factors(own.a, own.b, bias)
    return templates


def _from_templates(
    templates: Mapping[str, SlotBuffers], factors: Mapping[str, ModuleFactors]
) -> dict[str, SlotBuffers]:
    """The sets of an adapter of a layout whose factors are known to fit."""
    return {
        name: templates[name].with_factors(item.a, item.b, item.bias)
        for name, item in factors.items()
    }


class ResidentSets:
    """The resident sets of the adapters a host serves in place, by digest.

    Built once per adapter object (the first swap to it, which copies
    nothing either); the host `prune`s the sets of adapters it no longer
    holds (out of its LRU and not active) after every swap.
    """

    def __init__(self) -> None:
        self.vectors = ConstantVectors()
        self._sets: dict[str, tuple[LoadedAdapter, dict[str, SlotBuffers] | None]] = {}
        # id(layout) -> (the layout, its modules' templates; None: its factors do not fit):
        # the same shapes, dtypes, strides and scalings for every adapter of a layout
        self._layouts: dict[int, tuple[FactorLayout, dict[str, SlotBuffers] | None]] = {}

    def sets(
        self,
        adapter: LoadedAdapter,
        factors: Mapping[str, ModuleFactors],
        slots: Mapping[str, ModuleSlot],
    ) -> dict[str, SlotBuffers] | None:
        """Module -> resident set for every module `factors` targets; None when any of
        them is not slot-shaped (the adapter is then staged by copy)."""
        entry = self._sets.get(adapter.digest)
        if entry is not None and entry[0] is adapter:
            return entry[1]
        layout = adapter.layout
        known = None if layout is None else self._layouts.get(id(layout))
        built: dict[str, SlotBuffers] | None
        if known is not None and known[0] is layout:
            templates = known[1]
            built = None if templates is None else _from_templates(templates, factors)
        else:
            built = self._build(factors, slots)
            if layout is not None:
                if len(self._layouts) >= 64:
                    self._layouts.clear()
                self._layouts[id(layout)] = (layout, _templates(built, slots))
        self._sets[adapter.digest] = (adapter, built)
        return built

    def _build(
        self, factors: Mapping[str, ModuleFactors], slots: Mapping[str, ModuleSlot]
    ) -> dict[str, SlotBuffers] | None:
        built = {}
        for name, item in factors.items():
            buffers = resident_set(slots[name], item, self.vectors)
            if buffers is None:
                return None
            built[name] = buffers
        return built

    def prune(self, keep: Callable[[str], bool]) -> None:
        """Drop the sets of the adapters `keep` (given a digest) no longer wants."""
        for digest in [digest for digest in self._sets if not keep(digest)]:
            del self._sets[digest]

    def digests(self) -> set[str]:
        return set(self._sets)

    @property
    def nbytes(self) -> int:
        """Bytes of the host's own (the constant vectors; the rest are the adapters')."""
        return self.vectors.nbytes

    def clear(self) -> None:
        self._sets.clear()
        self._layouts.clear()
        self.vectors.clear()
