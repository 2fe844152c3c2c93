"""What a cold load works out once per adapter layout, not once per adapter.

Adapters of one layout (byte-identical `adapter_config.json`, and a tensors
file whose header bytes are identical: the same modules, ranks, dtypes and
offsets) differ only in their values. Two results are pure functions of those
bytes, and each is kept for the last `max_entries` layouts:

- `Inspections`: the `AdapterConfig` a PEFT directory resolves to (JSON
  parse, PEFT config resolution, validation) and its canonical blob (which
  names the directory in `directory_identity`). Kept for LoRA and DoRA only:
  the other kinds may read more than the config and the header (NOLA's
  tensors file, for one).
- `FactorLayout`: where each module's factors lie in the file, once a first
  adapter of the layout passed every check (features, tensors consumed,
  shapes and ranks: all decided by the config and the header). A later
  adapter of the layout gets its `ModuleFactors` as views of its file buffer
  straight away; its values are still checked, in one pass over the span the
  factors lie in.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Generic, TypeVar

import torch

from peftreg.adapters.factors import ModuleFactors
from peftreg.adapters.schema import AdapterConfig

Key = TypeVar("Key")
Value = TypeVar("Value")
INSPECTED_KINDS = ("lora", "dora")


class _Bounded(Generic[Key, Value]):
    """A small thread-safe LRU map."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[Key, Value] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Key) -> Value | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Key, value: Value) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


@dataclass(frozen=True)
class Inspected:
    """A directory's resolved config and its canonical blob."""

    config: AdapterConfig
    blob: bytes


# (config file bytes, tensors header bytes, tensors file size, base fingerprint, structure hash)
InspectionKey = tuple[bytes, bytes, int, str | None, str | None]
INSPECTIONS: _Bounded[InspectionKey, Inspected] = _Bounded(32)

Span = tuple[int, tuple[int, ...]]  # (offset in float32 elements from the buffer, shape)


@dataclass(frozen=True)
class _ModuleLayout:
    module: str
    layer: str
    scaling: float
    a: Span
    b: Span
    magnitude: Span | None
    bias: Span | None


def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = [1] * len(shape)
    for index in range(len(shape) - 2, -1, -1):
        strides[index] = strides[index + 1] * shape[index + 1]
    return tuple(strides)


@dataclass(frozen=True, eq=False)
class FactorLayout:
    """Each module's factors as (offset, shape) in a file buffer read as float32, and the
    span [begin, end) they all lie in."""

    modules: tuple[_ModuleLayout, ...]
    begin: int
    end: int

    @classmethod
    def of(cls, buffer: torch.Tensor, factors: Mapping[str, ModuleFactors]) -> FactorLayout | None:
        """The layout of `factors`, all contiguous fp32 views of `buffer` (uint8); None when
        they are not."""
        address = buffer.data_ptr()
        if address % 4 or not factors:
            return None
        size = buffer.numel()

        def maybe(tensor: torch.Tensor | None) -> Span | None:
            return None if tensor is None else span(tensor)

        def span(tensor: torch.Tensor) -> Span:
            offset = tensor.data_ptr() - address
            if (
                tensor.dtype != torch.float32
                or not tensor.is_contiguous()
                or offset % 4
                or not 0 <= offset <= size - 4 * tensor.numel()
            ):
                raise ValueError("not a view of the buffer")
            return offset // 4, tuple(tensor.shape)

        modules = []
        try:
            for name, item in factors.items():
                if item.mora_type is not None:
                    return None
                modules.append(
                    _ModuleLayout(
                        name,
                        item.layer,
                        item.scaling,
                        span(item.a),
                        span(item.b),
                        maybe(item.magnitude),
                        maybe(item.bias),
                    )
                )
        except ValueError:
            return None
        spans = [s for m in modules for s in (m.a, m.b, m.magnitude, m.bias) if s is not None]
        begin = min(offset for offset, _shape in spans)
        end = max(offset + _numel(shape) for offset, shape in spans)
        return cls(tuple(modules), begin, end)

    def factors(self, buffer: torch.Tensor) -> dict[str, ModuleFactors]:
        """The modules' factors as views of `buffer` (uint8, a file of this layout)."""
        floats = buffer[: buffer.numel() // 4 * 4].view(torch.float32)

        def view(span: Span) -> torch.Tensor:
            offset, shape = span
            return floats.as_strided(shape, _strides(shape), floats.storage_offset() + offset)

        def maybe(span: Span | None) -> torch.Tensor | None:
            return None if span is None else view(span)

        return {
            m.module: ModuleFactors(
                m.module,
                m.layer,  # type: ignore[arg-type]
                view(m.a),
                view(m.b),
                m.scaling,
                maybe(m.magnitude),
                maybe(m.bias),
            )
            for m in self.modules
        }

    @cached_property
    def nbytes(self) -> int:
        """Bytes of every module's factors (what an adapter of this layout holds)."""
        spans = [s for m in self.modules for s in (m.a, m.b, m.magnitude, m.bias) if s]
        return 4 * sum(_numel(shape) for _offset, shape in spans)

    def span(self, buffer: torch.Tensor) -> torch.Tensor:
        """Every value the factors lie among, as one float32 vector (a view of `buffer`)."""
        floats = buffer[: buffer.numel() // 4 * 4].view(torch.float32)
        return floats[self.begin : self.end]


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for side in shape:
        count *= side
    return count


# (config blob, tensors header bytes) -> the layout of the factors
LAYOUTS: _Bounded[tuple[bytes, bytes], FactorLayout] = _Bounded(32)
