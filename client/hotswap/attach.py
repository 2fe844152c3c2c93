"""What a host derives from its model and config when it is attached: each slot's device and
dtype, the base model's identity, and the soft-prompt slot."""

from __future__ import annotations

import torch
from torch import nn

from peftreg.hotswap.base import module_fingerprint
from peftreg.hotswap.config import HostConfig
from peftreg.hotswap.errors import HostError
from peftreg.hotswap.prompt import PromptSlot


def slot_device(config: HostConfig, weight: torch.Tensor) -> torch.device:
    """The weight's device; a configured device must be the same one."""
    wanted = config.device
    if wanted is not None:
        device = torch.device(wanted)
        if device.type != weight.device.type or (
            device.index is not None and device.index != weight.device.index
        ):
            raise HostError(
                f"the host's device is {device} but the model's weights are on "
                f"{weight.device}; move the model before attaching"
            )
    return weight.device


def slot_dtype(config: HostConfig, weight: torch.Tensor) -> torch.dtype:
    """The configured dtype, else the weight's (fp32 for a non-float weight)."""
    if config.dtype is not None:
        return config.dtype
    return weight.dtype if weight.dtype.is_floating_point else torch.float32


def base_identity(model: nn.Module, config: HostConfig) -> tuple[str | None, str | None]:
    """(fingerprint, structure hash) adapters are checked against, per `verify_base`."""
    fingerprint, structure = config.base_fingerprint, config.base_structure_hash
    if config.verify_base == "fingerprint" and fingerprint is None:
        computed = module_fingerprint(model)
        return computed.fingerprint, structure or computed.structure_hash
    if config.verify_base in ("fingerprint", "structure") and structure is None:
        structure = module_fingerprint(model, content=False).structure_hash
    return fingerprint, structure


def input_embeddings(model: nn.Module) -> tuple[nn.Module, torch.Tensor]:
    """The model's input embedding layer and its weight, where soft prompts go."""
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    if not isinstance(embedding, nn.Module):
        raise HostError(
            f"{type(model).__name__} has no get_input_embeddings(); soft prompts need "
            "the model's input embedding layer"
        )
    weight = embedding.weight
    assert isinstance(weight, torch.Tensor)
    return embedding, weight


def prompt_slot(model: nn.Module, config: HostConfig) -> PromptSlot | None:
    """The soft-prompt slot `max_virtual_tokens` asks for, on the input embeddings."""
    tokens = config.max_virtual_tokens
    if tokens == 0:
        return None
    embedding, weight = input_embeddings(model)
    return PromptSlot(
        embedding,
        model.forward,
        tokens,
        slot_device(config, weight),
        slot_dtype(config, weight),
    )
