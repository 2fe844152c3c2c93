"""The soft-prompt slot: virtual token embeddings prepended to a model's input embeddings.

A host with `max_virtual_tokens = V` always prepends V positions, so shapes
never change across swaps (no recompiles). An adapter of n <= V virtual
tokens fills the last n of them (next to the real tokens); the first V - n
are masked out of attention. The n virtual tokens sit at positions 0..n-1
and the real tokens follow, padding included, exactly as in PEFT's prompt
tuning (which puts a left-padded batch's padding between the virtual and the
real tokens, and ignores position ids a caller or `generate()` passes while a
prompt is active; without a prompt they are used). With `labels=`, the first
real token is scored from the last virtual token when there is one (as PEFT
does) and not at all when there is none (as the plain model does). The
model's outputs have V leading virtual positions (`AdapterHost.virtual_tokens`); PEFT's have n.

KV-cached generation works: the prefill prepends, and later steps (a filled
cache, which holds the V virtual positions) extend the attention mask and
shift positions instead (`PromptSlot.transform`). The cache holds the
virtual tokens of the adapter active at the prefill, so a request should
keep one adapter for all its steps: run it under `AdapterHost.pinned()`.

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

from peftreg.hotswap.errors import HostError, InputNotSupported
from peftreg.hotswap.slots import copy_into, fill

IGNORE_INDEX = -100


@dataclass(frozen=True)
class PromptSite:
    """What a soft prompt needs from a model: its embedding width, and a forward that
    takes `inputs_embeds` and `attention_mask` (and maybe `position_ids`)."""

    dim: int
    positional: tuple[str, ...]
    position_ids: bool

    @classmethod
    def of(cls, embedding: nn.Module, forward: Callable[..., Any]) -> PromptSite:
        weight = getattr(embedding, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            raise HostError("the model's input embeddings have no 2-d weight for a soft prompt")
        parameters = inspect.signature(forward).parameters
        for needed in ("inputs_embeds", "attention_mask"):
            if needed not in parameters:
                raise HostError(f"a soft prompt needs a forward that takes {needed}")
        positional = tuple(
            name
            for name, p in parameters.items()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        )
        return cls(int(weight.shape[1]), positional, "position_ids" in parameters)

    def keywords(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """A forward's arguments, all by name."""
        if len(args) > len(self.positional):
            raise InputNotSupported("too many positional arguments for the model's forward")
        return {**dict(zip(self.positional, args, strict=False)), **kwargs}


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
        self.embedding = embedding
        self.max_tokens = max_tokens
        self.dtype = dtype
        self.site = PromptSite.of(embedding, forward)
        self.dim = self.site.dim

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
        """The forward's arguments with the virtual tokens accounted for (active buffers).

        Without a filled KV cache (a whole sequence, or generate's prefill) the V
        virtual tokens are prepended. With one (generate's later steps) the
        cache already holds them: the inputs stay as given, and the attention
        mask gets the virtual tokens' mask in front, position ids shift by the
        adapter's n virtual tokens and `cache_position` by V, as PEFT does
        after its first step.
        """
        kwargs = self.site.keywords(args, kwargs)
        cached = _cached_length(_kv_cache(kwargs))
        if 0 < cached < self.max_tokens:
            raise InputNotSupported(
                f"the KV cache holds {cached} positions, fewer than the {self.max_tokens} "
                "virtual tokens; it was not filled through this host"
            )
        buffers = self.active
        embeds = kwargs.get("inputs_embeds")
        inputs = embeds if embeds is not None else kwargs.get("input_ids")
        if not isinstance(inputs, torch.Tensor):
            raise InputNotSupported("pass input_ids or inputs_embeds")
        batch, length = int(inputs.shape[0]), int(inputs.shape[1])
        if not cached:
            self._prepend(kwargs, buffers, batch)
        mask = kwargs.get("attention_mask")
        if mask is None:
            real = (cached - self.max_tokens if cached else 0) + length
            mask = torch.ones(batch, real, dtype=torch.int64, device=inputs.device)
        elif not isinstance(mask, torch.Tensor) or mask.ndim != 2:
            raise InputNotSupported(
                "a soft-prompt host extends 2-d attention masks only (batch, sequence); "
                "use a dynamic KV cache"
            )
        prefix = buffers.mask.to(mask.device, mask.dtype).unsqueeze(0).expand(batch, -1)
        full = torch.cat([prefix, mask], dim=1)
        kwargs["attention_mask"] = full
        if self.site.position_ids:
            given = kwargs.get("position_ids")
            kwargs["position_ids"] = prompt_positions(given, full, length, cached, self.max_tokens)
        where = kwargs.get("cache_position")
        if isinstance(where, torch.Tensor):
            shifted = where + self.max_tokens
            if not cached:
                leading = torch.arange(self.max_tokens, device=where.device, dtype=where.dtype)
                shifted = torch.cat([leading, shifted])
            kwargs["cache_position"] = shifted
        labels = kwargs.get("labels")
        if isinstance(labels, torch.Tensor) and not cached:
            prefix = buffers.mask.unsqueeze(0).expand(batch, -1)
            kwargs["labels"] = prompt_labels(labels, prefix, self.max_tokens)
        return (), kwargs

    def _prepend(self, kwargs: dict[str, Any], buffers: PromptBuffers, batch: int) -> None:
        embeds = kwargs.pop("inputs_embeds", None)
        input_ids = kwargs.pop("input_ids", None)
        if embeds is None:
            embeds = self.embedding(input_ids)
        virtual = buffers.embeds.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        kwargs["inputs_embeds"] = torch.cat([virtual, embeds], dim=1)


def prompt_labels(labels: torch.Tensor, prefix: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """The caller's labels behind V ignored ones; `prefix` (batch, V) marks each row's
    virtual tokens.

    A causal LM scores token i from position i - 1. With n virtual tokens the first
    real token is scored from the last of them, as in PEFT. Without any (an adapter
    that has no prompt, or none) the position before it is an unused, masked slot:
    like the plain model, which has no position before its first token, it is not
    scored.
    """
    batch = labels.shape[0]
    ignored = torch.full(
        (batch, max_tokens), IGNORE_INDEX, dtype=labels.dtype, device=labels.device
    )
    # Tensor ops, not a branch on the count: a compiled model does not recompile.
    first = labels[:, :1]
    has_prompt = prefix.to(labels.device).sum(-1, keepdim=True) > 0
    first = torch.where(has_prompt, first, torch.full_like(first, IGNORE_INDEX))
    return torch.cat([ignored, first, labels[:, 1:]], dim=1)


def prompt_positions(
    given: torch.Tensor | None, full: torch.Tensor, length: int, cached: int, max_tokens: int
) -> torch.Tensor:
    """Positions of this call's tokens, per row: the row's n virtual tokens are 0..n-1 and
    the real tokens follow: the caller's positions shifted by n.

    Without the caller's positions, and always while a row has a prompt (PEFT ignores
    the caller's, `generate()`'s counted over the attention mask included), the model's
    own default: the index in the real sequence (padding included), so a left-padded
    batch is placed as PEFT places it, with the padding between the virtual and the
    real tokens.
    """
    prefix = full[:, :max_tokens].long()
    count = prefix.sum(-1, keepdim=True)
    start = cached - max_tokens if cached else 0
    default = torch.arange(start, start + length, device=full.device).unsqueeze(0)
    default = default.expand(full.shape[0], -1)
    # Tensor ops, not a branch on the count: a compiled model does not recompile.
    given = default if given is None else torch.where(count > 0, default, given)
    shifted = given + count
    if cached:
        return shifted
    virtual = (prefix.cumsum(-1) - 1).clamp(min=0)
    return torch.cat([virtual, shifted], dim=1)


# transformers' generate() hands the KV cache over as `past_key_values` (4.x) or
# as `cache` (5.25 and later); a model's forward takes one of the two.
KV_CACHE_ARGUMENTS = ("past_key_values", "cache")


def _kv_cache(kwargs: dict[str, Any]) -> Any:
    """The KV cache among a forward's arguments, under whichever name it came."""
    for name in KV_CACHE_ARGUMENTS:
        past = kwargs.get(name)
        if past is not None:
            return past
    return None


def _cached_length(past: Any) -> int:
    """Positions a KV cache holds (0: none or empty)."""
    if past is None:
        return 0
    length = getattr(past, "get_seq_length", None)
    if callable(length):
        return int(length())
    if isinstance(past, tuple | list) and past and isinstance(past[0], tuple | list):
        return int(past[0][0].shape[-2])
    raise InputNotSupported(f"a KV cache of type {type(past).__name__} is not supported")
