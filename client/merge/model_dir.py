"""The non-tensor files of a merged model directory: config.json and the tokenizer files."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from peftreg.adapters.base_package import BASE_FILES
from peftreg.checkpoint.writer import INDEX_FILE, copy_durably, write_durably
from peftreg.merge.errors import MergeError

CONFIG_FILE = "config.json"


def dtype_label(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> `bfloat16`, as config.json writes it."""
    return str(dtype).removeprefix("torch.")


def read_model_config(base_dir: Path) -> dict[str, Any]:
    """The base's config.json; refused when absent or when the base is already quantized."""
    path = Path(base_dir) / CONFIG_FILE
    if not path.is_file():
        raise MergeError(
            f"{base_dir} has no {CONFIG_FILE}; merge needs a Hugging Face model directory"
        )
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MergeError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise MergeError(f"{path} must hold a JSON object")
    if document.get("quantization_config"):
        raise MergeError(
            f"the base is already quantized ({CONFIG_FILE} has a quantization_config); "
            "merge needs its unquantized weights"
        )
    return document


def output_model_config(
    model_config: Mapping[str, Any],
    dtype: torch.dtype | None,
    encoder_update: Mapping[str, Any],
    config_extra: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The merged checkpoint's config.json: `dtype` (and `torch_dtype` when the base has
    it) set to a requested output dtype, then the encoder's keys, then the extra keys."""
    document = dict(model_config)
    if dtype is not None:
        document["dtype"] = dtype_label(dtype)
        if "torch_dtype" in document:
            document["torch_dtype"] = dtype_label(dtype)
    document.update(encoder_update)
    document.update(config_extra or {})
    return document


def write_model_files(base_dir: Path, directory: Path, config: Mapping[str, Any]) -> None:
    """config.json, and a copy of every tokenizer / generation file the base has (each
    fsynced: the directory is committed right after)."""
    document = json.dumps(dict(config), indent=2, sort_keys=True) + "\n"
    write_durably(directory / CONFIG_FILE, document.encode("utf-8"))
    for title in BASE_FILES:
        source = Path(base_dir) / title
        if title not in (CONFIG_FILE, INDEX_FILE) and source.is_file():
            copy_durably(source, directory / title)
