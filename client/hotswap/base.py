"""The identity of a base model in memory, as `peftreg.formats.fingerprint` computes it on disk.

The state dict stands in for the safetensors files: names, safetensors dtype
names, shapes and (for the content fingerprint) the sha256 of each tensor's
bytes. Tensors that share storage with an earlier entry (tied embeddings)
are counted once under their first name, as `save_pretrained` keeps them.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from peftreg.formats.fingerprint import BaseFingerprint, TensorRecord, fingerprint_records

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def _unique_state(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    unique = []
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        unique.append((name, tensor))
    return unique


def _dtype_name(tensor: torch.Tensor) -> str:
    """The safetensors dtype name (a dtype safetensors lacks keeps torch's name: such a
    model matches no registered base)."""
    return SAFETENSORS_DTYPES.get(tensor.dtype, str(tensor.dtype))


def module_fingerprint(model: nn.Module, *, content: bool = True) -> BaseFingerprint:
    """Fingerprint and structure hash of a model's weights; `content=False` skips the data
    hashes (the fingerprint field then holds the structure hash too)."""
    records = []
    for name, tensor in _unique_state(model):
        digest = ""
        if content:
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            digest = hashlib.sha256(data.numpy().data).hexdigest()
        records.append(TensorRecord(name, _dtype_name(tensor), tuple(tensor.shape), digest))
    result = fingerprint_records(records)
    if content:
        return result
    return BaseFingerprint(
        result.structure_hash, result.structure_hash, result.tensors, result.parameters
    )
