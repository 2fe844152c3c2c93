"""Staging programs: the copies that write one adapter's factors into one set of slot buffers,
worked out once and replayed on every swap to that adapter.

A swap stages a LoRA-family adapter by copying each target module's A and B
into the spare buffers. Working out those copies (slicing the buffers to the
adapter's rank, viewing tensors as numpy arrays, matching dtypes) costs more
Python per tensor than the copy itself for a rank-16 factor, so a host keeps,
per adapter and per buffer set, the list of (target, source) pairs. A warm
swap is then one loop of copies (numpy, single-threaded, for a CPU slot in
the factors' dtype) plus one batched `torch._foreach_copy_` for the rest (a
GPU or a half-precision slot). The rest of a slot's state (zeroing beyond the
rank, gain, bias, DoRA row factors) stays with `ModuleSlot.stage`.

A program holds views of the slot buffers and of the adapter's tensors, and
the adapter itself: an entry is found by the adapter's digest and used only
for that very object, so a program never outlives or mistakes its adapter.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from peftreg.adapters.factors import ModuleFactors
from peftreg.hotswap.adapter import LoadedAdapter
from peftreg.hotswap.slots import ModuleSlot, SlotBuffers, numpy_view


@dataclass
class StagingProgram:
    """(target, source) copies for A and B of every targeted slot into one buffer set."""

    adapter: LoadedAdapter
    arrays: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    targets: list[torch.Tensor] = field(default_factory=list)
    sources: list[torch.Tensor] = field(default_factory=list)
    nbytes: int = 0

    def add(self, target: torch.Tensor, array: np.ndarray | None, source: torch.Tensor) -> None:
        values = None if array is None else numpy_view(source)
        if array is not None and values is not None and values.dtype == array.dtype:
            self.arrays.append((array, values))
        else:
            self.targets.append(target)
            self.sources.append(source)
        self.nbytes += target.numel() * target.element_size()

    def run(self) -> int:
        """Copy every pair; bytes written."""
        for array, values in self.arrays:
            array[...] = values
        if self.targets:
            torch._foreach_copy_(self.targets, self.sources, non_blocking=True)
        return self.nbytes


def build_program(
    adapter: LoadedAdapter,
    factors: Mapping[str, ModuleFactors],
    buffers: Mapping[str, SlotBuffers],
) -> StagingProgram:
    """The copies writing each module's A into the first `rank` rows of its buffer and B into
    the first `rank` columns (`buffers`: the set to write, by module)."""
    program = StagingProgram(adapter)
    for name, item in factors.items():
        spare = buffers[name]
        rank = item.rank
        writable = spare.fields()
        region_a, region_b = (slice(0, rank),), (slice(None), slice(0, rank))
        array_a, array_b = spare.arrays.get("a"), spare.arrays.get("b")
        program.add(writable["a"][region_a], None if array_a is None else array_a[region_a], item.a)
        program.add(writable["b"][region_b], None if array_b is None else array_b[region_b], item.b)
    return program


class ProgramCache:
    """Programs by (adapter digest, buffer set).

    A program keeps its adapter's tensors alive, so when one is built the
    programs of adapters `keep` no longer wants (those the host's LRU
    dropped) are dropped too, and at most `max_entries` are kept.
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._programs: OrderedDict[tuple[str, int], StagingProgram] = OrderedDict()

    def program(
        self,
        adapter: LoadedAdapter,
        factors: Mapping[str, ModuleFactors],
        slots: Mapping[str, ModuleSlot],
        keep: Callable[[str], bool],
    ) -> StagingProgram:
        """The program staging `factors` (of `adapter`) into the slots' spare buffers."""
        spare_set = next(iter(slots.values())).spare.index if slots else 0
        key = (adapter.digest, spare_set)
        program = self._programs.get(key)
        if program is None or program.adapter is not adapter:
            for stale in [k for k in self._programs if k[0] != key[0] and not keep(k[0])]:
                del self._programs[stale]
            buffers = {name: slot.spare for name, slot in slots.items()}
            program = build_program(adapter, factors, buffers)
            self._programs[key] = program
        self._programs.move_to_end(key)
        while len(self._programs) > self.max_entries:
            self._programs.popitem(last=False)
        return program

    def __len__(self) -> int:
        return len(self._programs)

    def clear(self) -> None:
        self._programs.clear()
