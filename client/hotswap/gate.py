"""The forward gate: forward passes share it, a swap's flip holds it alone.

A forward pass must see one adapter from its first layer to its last. The
host wraps the model's `forward` (an instance attribute over the class's, or
over an instance `forward` already there, such as accelerate's hooks) so
that every call enters the gate as a reader for its whole duration; a flip
waits for the readers in flight to leave and keeps new ones out while it
exchanges buffer references (microseconds). Writers are preferred, so a
stream of forwards cannot starve a swap. A thread already inside a forward
re-enters freely (nested calls, and every step of a `generate` under
`AdapterHost.pinned()`), and a swap from inside a forward is an error rather
than a deadlock. A flip may be given a deadline: when the readers do not
drain in time it gives up (`FlipTimeout`) and the readers go on.

The wrapper is excluded from dynamo non-recursively (and the gate and the
input transform recursively): under `torch.compile` the model's own forward
is compiled as its own frame, the gate stays plain Python, and an exception
in the forward always leaves the gate.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from peftreg.hotswap.errors import FlipTimeout, HostError

InputTransform = Callable[[tuple[Any, ...], dict[str, Any]], tuple[tuple[Any, ...], dict[str, Any]]]
MARKER = "__peftreg_gate__"  # set on the wrapper this module installs


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

    @property
    def readers(self) -> int:
        """Readers inside the gate now (forwards in flight, pinned requests)."""
        with self._condition:
            return self._readers

    @contextmanager
    def reading(self) -> Iterator[None]:
        self.enter()
        try:
            yield
        finally:
            self.leave()

    @contextmanager
    def exclusive(self, timeout: float | None = None) -> Iterator[None]:
        """Hold the gate alone; with `timeout`, raise `FlipTimeout` when the readers in
        flight have not left after that many seconds."""
        if self._depth():
            raise HostError("a swap cannot run inside a forward pass of the same model")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._condition:
            self._waiting_writers += 1
            try:
                while self._writer or self._readers:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise FlipTimeout(
                            f"{self._readers} forward pass(es) or pinned request(s) still ran "
                            f"after {timeout} s; the previous adapter stays active"
                        )
                    self._condition.wait(left)
            finally:
                self._waiting_writers -= 1
                self._condition.notify_all()  # readers held back by this writer may go on
            self._writer = True
        try:
            yield
        finally:
            with self._condition:
                self._writer = False
                self._condition.notify_all()


class GatedForward:
    """Installs the gate (and an optional input transform) around `model.forward`.

    An instance `forward` already there (accelerate's hooks set one) is
    wrapped and put back by `remove()`; only a wrapper of this module (its
    `__peftreg_gate__` marker: another host) is refused.
    """

    def __init__(
        self, model: nn.Module, gate: ForwardGate, transform: InputTransform | None = None
    ) -> None:
        existing = vars(model).get("forward")
        if existing is not None and getattr(existing, MARKER, False):
            raise HostError(
                f"{type(model).__name__}.forward is already wrapped by another AdapterHost; "
                "detach it first"
            )
        self.model = model
        self.previous: Callable[..., Any] | None = existing
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

        wrapper = torch.compiler.disable(forward, recursive=False)  # type: ignore[no-untyped-call]
        setattr(wrapper, MARKER, True)
        self.wrapper: Callable[..., Any] | None = wrapper
        model.forward = wrapper

    def remove(self) -> None:
        """Put back what `forward` was (the class's, or the instance's earlier wrapper), and
        drop the wrapper (and with it the input transform and its buffers)."""
        wrapper, self.wrapper = self.wrapper, None
        if wrapper is None or vars(self.model).get("forward") is not wrapper:
            return
        if self.previous is None:
            del self.model.forward
        else:
            self.model.forward = self.previous
