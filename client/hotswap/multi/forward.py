"""The multi-adapter host's wrapper around `model.forward`: one batch in the model at a time,
each row on its slot.

A forward inside `MultiAdapterHost.batch()` runs with that batch's per-row
slots; a forward outside any batch runs every row on the base model. The
wrapper holds the host's batch lock (re-entrant: the thread inside `batch()`
already holds it) for the call, checks that the batch size matches the
rows, and applies the per-row soft prompt. Like `peftreg.hotswap.gate`, the
wrapper is excluded from dynamo non-recursively and the transform
recursively, so a compiled model's forward is its own frame.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from peftreg.hotswap.errors import HostError, InputNotSupported
from peftreg.hotswap.gate import MARKER
from peftreg.hotswap.multi.prompt import StackedPrompt
from peftreg.hotswap.multi.rows import BatchRows


def batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """The batch size of a forward call: input_ids / inputs_embeds, else the first tensor."""
    for name in ("input_ids", "inputs_embeds"):
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    for value in args:
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    raise InputNotSupported("a multi-adapter forward needs a batched input tensor")


class BatchedForward:
    """Installs the wrapper; `remove()` puts back what `forward` was."""

    def __init__(
        self,
        model: nn.Module,
        rows: BatchRows,
        lock: threading.RLock,
        in_batch: Callable[[], bool],
        prompt: StackedPrompt | None,
    ) -> None:
        existing = vars(model).get("forward")
        if existing is not None and getattr(existing, MARKER, False):
            raise HostError(
                f"{type(model).__name__}.forward is already wrapped by another host; "
                "detach it first"
            )
        self.model = model
        self.previous: Callable[..., Any] | None = existing
        original: Callable[..., Any] = model.forward
        prepare = None if prompt is None else torch.compiler.disable(prompt.transform)  # type: ignore[no-untyped-call]

        def setup(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            size = batch_size(args, kwargs)
            if not in_batch():
                rows.modules = rows.base_only(size)
            elif int(rows.modules.shape[0]) != size:
                raise InputNotSupported(
                    f"the batch names {int(rows.modules.shape[0])} rows but the forward got "
                    f"{size}; name one adapter (or None) per row"
                )

        check = torch.compiler.disable(setup)  # type: ignore[no-untyped-call]

        @functools.wraps(original)
        def forward(*args: Any, **kwargs: Any) -> Any:
            with lock:
                check(args, kwargs)
                if prepare is not None:
                    args, kwargs = prepare(rows.modules, args, kwargs)
                return original(*args, **kwargs)

        wrapper = torch.compiler.disable(forward, recursive=False)  # type: ignore[no-untyped-call]
        setattr(wrapper, MARKER, True)
        self.wrapper: Callable[..., Any] | None = wrapper
        model.forward = wrapper

    def remove(self) -> None:
        wrapper, self.wrapper = self.wrapper, None
        if wrapper is None or vars(self.model).get("forward") is not wrapper:
            return
        if self.previous is None:
            del self.model.forward
        else:
            self.model.forward = self.previous
