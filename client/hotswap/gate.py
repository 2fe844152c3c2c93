"""The forward gate: forward passes share it, a swap's flip holds it alone.

A forward pass must see one adapter from its first layer to its last. The
host wraps the model's `forward` (an instance attribute over the class's)
so that every call enters the gate as a reader for its whole duration; a
flip waits for the readers in flight to leave and keeps new ones out while
it exchanges buffer references (microseconds). Writers are preferred, so a
stream of forwards cannot starve a swap. A thread already inside a forward
re-enters freely (nested calls), and a swap from inside a forward is an error
rather than a deadlock.

The wrapper is excluded from dynamo non-recursively (and the gate and the
input transform recursively): under `torch.compile` the model's own forward
is compiled as its own frame, the gate stays plain Python, and an exception
in the forward always leaves the gate.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from client.hotswap.errors import HostError

InputTransform = Callable[[tuple[Any, ...], dict[str, Any]], tuple[tuple[Any, ...], dict[str, Any]]]


class ForwardGate:
    """A readers-writer gate: many forwards, or one flip."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0
        self._local = threading.local()

    def _depth(self) -> int:
        return int(getattr(self._local, "depth", 0))

    def enter(self) -> None:
        """A forward pass starts (waits while a flip is pending or running)."""
        depth = self._depth()
        if depth == 0:
            with self._condition:
                while self._writer or self._waiting_writers:
                    self._condition.wait()
                self._readers += 1
        self._local.depth = depth + 1

    def leave(self) -> None:
        """A forward pass ends (normally or by an exception)."""
        depth = self._depth() - 1
        self._local.depth = depth
        if depth == 0:
            with self._condition:
                self._readers -= 1
                if self._readers == 0:
                    self._condition.notify_all()

    @contextmanager
    def reading(self) -> Iterator[None]:
        self.enter()
        try:
            yield
        finally:
            self.leave()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        if self._depth():
            raise HostError("a swap cannot run inside a forward pass of the same model")
        with self._condition:
            self._waiting_writers += 1
            try:
                while self._writer or self._readers:
                    self._condition.wait()
            finally:
                self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._condition:
                self._writer = False
                self._condition.notify_all()


class GatedForward:
    """Installs the gate (and an optional input transform) around `model.forward`."""

    def __init__(
        self, model: nn.Module, gate: ForwardGate, transform: InputTransform | None = None
    ) -> None:
        if "forward" in vars(model):
            raise HostError(
                f"{type(model).__name__}.forward is already wrapped (another host attached?)"
            )
        self.model = model
        self.original: Callable[..., Any] = model.forward
        original = self.original
        # Plain Python for dynamo: the gate, and the input transform (run eagerly).
        enter = torch.compiler.disable(gate.enter)  # type: ignore[no-untyped-call]
        leave = torch.compiler.disable(gate.leave)  # type: ignore[no-untyped-call]
        prepare = None if transform is None else torch.compiler.disable(transform)  # type: ignore[no-untyped-call]

        @functools.wraps(original)
        def forward(*args: Any, **kwargs: Any) -> Any:
            enter()
            try:
                if prepare is not None:
                    args, kwargs = prepare(args, kwargs)
                return original(*args, **kwargs)
            finally:
                leave()

        self.wrapper = torch.compiler.disable(forward, recursive=False)  # type: ignore[no-untyped-call]
        model.forward = self.wrapper

    def remove(self) -> None:
        if vars(self.model).get("forward") is self.wrapper:
            del self.model.forward
