"""Staging programs: the copies that write one adapter's factors into one set of slot buffers,
worked out once and replayed on every swap to that adapter.

A swap stages a LoRA-family adapter that is not served in place
(`peftreg.hotswap.resident`: one of a lower rank than the host's, another
dtype, a GPU host) by copying each target module's A and B into the spare
buffers. Working out those copies (slicing the buffers to the
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
    pairs = program.arrays
    for name, item in factors.items():
        spare = buffers[name]
        rank = item.rank
        array_a, array_b = spare.arrays.get("a"), spare.arrays.get("b")
        values_a, values_b = numpy_view(item.a), numpy_view(item.b)
        if (  # the common case, without a tensor view per factor: numpy to numpy
            array_a is not None
            and array_b is not None
            and values_a is not None
            and values_b is not None
            and values_a.dtype == array_a.dtype
            and values_b.dtype == array_b.dtype
        ):
            target_a, target_b = array_a[:rank], array_b[:, :rank]
            pairs.append((target_a, values_a))
            pairs.append((target_b, values_b))
            program.nbytes += target_a.nbytes + target_b.nbytes
            continue
        a = spare.a.T if spare.transposed_a else spare.a  # (R, in) whatever the layout
        program.add(a[:rank], None if array_a is None else array_a[:rank], item.a)
        program.add(spare.b[:, :rank], None if array_b is None else array_b[:, :rank], item.b)
    return program


class ProgramCache:
    """Programs by (adapter digest, buffer set), at most `max_entries`.

    A program keeps its adapter's tensors alive: the host `prune`s the
    programs of adapters it no longer holds (dropped by its LRU) after
    every swap.
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._programs: OrderedDict[tuple[str, int], StagingProgram] = OrderedDict()

    def program(
        self,
        adapter: LoadedAdapter,
        factors: Mapping[str, ModuleFactors],
        slots: Mapping[str, ModuleSlot],
    ) -> StagingProgram:
        """The program staging `factors` (of `adapter`) into the slots' spare buffers."""
        spare_set = next(iter(slots.values())).spare.index if slots else 0
        key = (adapter.digest, spare_set)
        program = self._programs.get(key)
        if program is None or program.adapter is not adapter:
            buffers = {name: slot.spare for name, slot in slots.items()}
            program = build_program(adapter, factors, buffers)
            self._programs[key] = program
        self._programs.move_to_end(key)
        while len(self._programs) > self.max_entries:
            self._programs.popitem(last=False)
        return program

    def prune(self, keep: Callable[[str], bool]) -> None:
        """Drop the programs of the adapters `keep` (given a digest) no longer wants."""
        for key in [key for key in self._programs if not keep(key[0])]:
            del self._programs[key]

    def digests(self) -> set[str]:
        """The adapters programs are kept for."""
        return {digest for digest, _set in self._programs}

    def clear(self) -> None:
        self._programs.clear()
