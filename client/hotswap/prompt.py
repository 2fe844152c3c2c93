"""The soft-prompt slot: virtual token embeddings prepended to a model's input embeddings.

A host with `max_virtual_tokens = V` always prepends V positions, so shapes
never change across swaps (no recompiles). An adapter of n <= V virtual
tokens fills the last n of them (next to the real tokens); the first V - n
are masked out of attention. Position ids are counted over unmasked
positions, so the n virtual tokens sit at positions 0..n-1 and the real
tokens follow, exactly as in PEFT's prompt tuning. The model's outputs have
V leading virtual positions (`AdapterHost.virtual_tokens`); PEFT's have n.

Like the module slots, the prompt slot is double-buffered: a swap stages into
the spare and the flip exchanges references.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from client.hotswap.errors import HostError, InputNotSupported
from client.hotswap.slots import copy_into, fill

IGNORE_INDEX = -100


@dataclass
class PromptBuffers:
    embeds: torch.Tensor  # (V, dim)
    mask: torch.Tensor  # (V,) int64: 1 for the adapter's virtual tokens, 0 for unused ones
    count: int = 0
    clean: bool = True


class PromptSlot:
    """V virtual tokens before the input embeddings of `embedding`."""

    def __init__(
        self,
        embedding: nn.Module,
        forward: Callable[..., Any],
        max_tokens: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        weight = getattr(embedding, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            raise HostError("the model's input embeddings have no 2-d weight for a soft prompt")
        self.embedding = embedding
        self.max_tokens = max_tokens
        self.dim = int(weight.shape[1])
        parameters = inspect.signature(forward).parameters
        self._positional = [
            name
            for name, p in parameters.items()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        for needed in ("inputs_embeds", "attention_mask"):
            if needed not in parameters:
                raise HostError(f"a soft prompt needs a forward that takes {needed}")
        self._position_ids = "position_ids" in parameters

        def buffers() -> PromptBuffers:
            return PromptBuffers(
                embeds=torch.zeros(max_tokens, self.dim, device=device, dtype=dtype),
                mask=torch.zeros(max_tokens, device=device, dtype=torch.int64),
            )

        self.active = buffers()
        self.spare = buffers()

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for b in (self.active, self.spare)
            for t in (b.embeds, b.mask)
        )

    def stage(self, prompt: torch.Tensor | None) -> int:
        """Write `prompt` (n, dim) right-aligned into the spare; bytes written."""
        spare = self.spare
        spare.clean = False
        count = 0 if prompt is None else int(prompt.shape[0])
        start = self.max_tokens - count
        fill(spare.embeds[:start], 0.0)
        spare.mask[:start].zero_()
        if prompt is not None:
            copy_into(spare.embeds[start:], prompt)
            spare.mask[start:].fill_(1)
        spare.count = count
        spare.clean = True
        return sum(t.numel() * t.element_size() for t in (spare.embeds, spare.mask))

    def flip(self) -> None:
        self.active, self.spare = self.spare, self.active

    def transform(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The forward's arguments with the virtual tokens prepended (active buffers)."""
        if len(args) > len(self._positional):
            raise InputNotSupported("too many positional arguments for the model's forward")
        kwargs = {**dict(zip(self._positional, args, strict=False)), **kwargs}
        past = kwargs.get("past_key_values")
        if past is not None and _cached_length(past) > 0:
            raise InputNotSupported(
                "a soft-prompt host runs whole sequences; incremental decoding with a filled "
                "KV cache is not supported"
            )
        buffers = self.active
        embeds = kwargs.pop("inputs_embeds", None)
        input_ids = kwargs.pop("input_ids", None)
        if embeds is None:
            if input_ids is None:
                raise InputNotSupported("pass input_ids or inputs_embeds")
            embeds = self.embedding(input_ids)
        batch, length = int(embeds.shape[0]), int(embeds.shape[1])
        virtual = buffers.embeds.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        kwargs["inputs_embeds"] = torch.cat([virtual, embeds], dim=1)
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.int64, device=embeds.device)
        prefix = buffers.mask.to(mask.dtype).unsqueeze(0).expand(batch, -1)
        full = torch.cat([prefix, mask], dim=1)
        kwargs["attention_mask"] = full
        if self._position_ids:
            positions = kwargs.get("position_ids")
            if positions is None:
                kwargs["position_ids"] = (full.long().cumsum(-1) - 1).clamp(min=0)
            else:  # the caller's positions, after the adapter's virtual tokens
                virtual_positions = (prefix.long().cumsum(-1) - 1).clamp(min=0)
                shifted = positions + prefix.long().sum(-1, keepdim=True)
                kwargs["position_ids"] = torch.cat([virtual_positions, shifted], dim=1)
        labels = kwargs.get("labels")
        if isinstance(labels, torch.Tensor):
            ignored = torch.full(
                (batch, self.max_tokens), IGNORE_INDEX, dtype=labels.dtype, device=labels.device
            )
            kwargs["labels"] = torch.cat([ignored, labels], dim=1)
        return (), kwargs


def _cached_length(past: Any) -> int:
    length = getattr(past, "get_seq_length", None)
    if callable(length):
        return int(length())
    return 1
