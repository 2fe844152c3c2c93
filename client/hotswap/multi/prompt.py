"""Soft prompts per row: each row of a batch gets its own adapter's virtual tokens, or none.

The stacked prompt slot holds, for K adapter slots and the all-zero base slot,
V virtual-token embeddings (K+1, V, dim) and their mask (K+1, V). An adapter
of n <= V virtual tokens fills the last n positions of its slot and the first
V - n are masked out, as in the single-adapter `peftreg.hotswap.prompt`; a
LoRA-family adapter's slot and the base slot are all masked. So every row has
V leading positions (shapes never depend on the mix), and each row's own
mask and positions make its real tokens see exactly its n virtual tokens, at
positions 0..n-1, with its real tokens after them: PEFT's prompt tuning row
by row.

KV-cached generation works per row: the prefill prepends each row's virtual
tokens; later steps (a filled cache) put each row's virtual-token mask in
front of the attention mask and shift each row's positions by its own n.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from peftreg.hotswap.errors import InputNotSupported
from peftreg.hotswap.prompt import (
    PromptSite,
    _cached_length,
    _kv_cache,
    prompt_labels,
    prompt_positions,
)
from peftreg.hotswap.slots import copy_into, fill


class StackedPrompt:
    """V virtual tokens per slot before the input embeddings of `embedding`."""

    def __init__(
        self,
        embedding: nn.Module,
        forward: Callable[..., Any],
        count: int,
        max_tokens: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.embedding = embedding
        self.max_tokens = max_tokens
        self.dtype = dtype
        self.site = PromptSite.of(embedding, forward)
        self.dim = self.site.dim
        self.embeds = torch.zeros(count + 1, max_tokens, self.dim, device=device, dtype=dtype)
        self.mask = torch.zeros(count + 1, max_tokens, device=device, dtype=torch.int64)
        self.counts = [0] * (count + 1)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.embeds, self.mask))

    def write(self, slot: int, prompt: torch.Tensor | None) -> int:
        """Write `prompt` (n, dim) right-aligned into slot `slot` (None: all masked); bytes."""
        count = 0 if prompt is None else int(prompt.shape[0])
        start = self.max_tokens - count
        embeds, mask = self.embeds[slot], self.mask[slot]
        previous, self.counts[slot] = self.counts[slot], self.max_tokens  # unknown until done
        written = 0
        if previous > count:
            written += fill(embeds[self.max_tokens - previous : start], 0.0)
            mask[self.max_tokens - previous : start].zero_()
        if prompt is not None:
            written += copy_into(embeds[start:], prompt)
            mask[start:].fill_(1)
        self.counts[slot] = count
        return written + mask.numel() * mask.element_size()

    def transform(
        self, rows: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The forward's arguments with each row's virtual tokens accounted for.

        `rows` (batch,) is each row's slot. Without a filled KV cache the V
        positions of each row's slot are prepended; with one the inputs stay,
        and the attention mask, position ids and `cache_position` are extended
        and shifted (see `peftreg.hotswap.prompt.PromptSlot.transform`).
        """
        kwargs = self.site.keywords(args, kwargs)
        cached = _cached_length(_kv_cache(kwargs))
        if 0 < cached < self.max_tokens:
            raise InputNotSupported(
                f"the KV cache holds {cached} positions, fewer than the {self.max_tokens} "
                "virtual tokens; it was not filled through this host"
            )
        embeds = kwargs.get("inputs_embeds")
        inputs = embeds if embeds is not None else kwargs.get("input_ids")
        if not isinstance(inputs, torch.Tensor):
            raise InputNotSupported("pass input_ids or inputs_embeds")
        batch, length = int(inputs.shape[0]), int(inputs.shape[1])
        rows = rows.to(self.embeds.device)
        if not cached:
            self._prepend(kwargs, rows)
        mask = kwargs.get("attention_mask")
        if mask is None:
            real = (cached - self.max_tokens if cached else 0) + length
            mask = torch.ones(batch, real, dtype=torch.int64, device=inputs.device)
        elif not isinstance(mask, torch.Tensor) or mask.ndim != 2:
            raise InputNotSupported(
                "a soft-prompt host extends 2-d attention masks only (batch, sequence); "
                "use a dynamic KV cache"
            )
        prefix = self.mask.index_select(0, rows).to(mask.device, mask.dtype)
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
            kwargs["labels"] = prompt_labels(labels, prefix, self.max_tokens)
        return (), kwargs

    def _prepend(self, kwargs: dict[str, Any], rows: torch.Tensor) -> None:
        embeds = kwargs.pop("inputs_embeds", None)
        input_ids = kwargs.pop("input_ids", None)
        if embeds is None:
            embeds = self.embedding(input_ids)
        virtual = self.embeds.index_select(0, rows).to(embeds.dtype)
        kwargs["inputs_embeds"] = torch.cat([virtual, embeds], dim=1)
