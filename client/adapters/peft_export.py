"""Write a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`).

For LoRA, DoRA, prompt and prefix tuning the config is the imported
`peft_config` and the tensors file is copied as it is. PEFT has no NOLA, so a
NOLA adapter is written as its materialized LoRA (digest checked) with a
LoRA config built from the NOLA spec and targets; the returned note says so.
The directory is built next to its final place and renamed into it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from peftreg.adapters.directory_writer import write_directory
from peftreg.adapters.nola import materialize
from peftreg.adapters.peft_import import (
    CONFIG_FILE,
    TENSORS_FILE,
    PeftImportError,
    read_safetensors_header,
)
from peftreg.adapters.schema import AdapterConfig

NOLA_NOTE = "exported NOLA as its materialized LoRA (PEFT has no NOLA)"
MORA_NOTE = (
    "exported MoRA as peft-mora saved it (use_mora): load it with peft-mora "
    "(github.com/kongds/MoRA); peft itself ignores use_mora and refuses the square matrices"
)
# adapter_config.json key naming the registered base exactly (PEFT ignores unknown keys).
BASE_KEY = "peftreg_base"


def registered_base_name(config: AdapterConfig) -> str | None:
    """The registered base's reference (`ns/name:tag`) when the adapter was pushed with
    `--base REF`: then it replaced the trainer's base_model_name_or_path."""
    base = config.base
    trainer = config.peft_config.get("base_model_name_or_path")
    if base.name and base.name != trainer and (base.fingerprint or base.structure_hash):
        return base.name
    return None


def truthful_base(config: AdapterConfig, document: Mapping[str, Any]) -> dict[str, Any]:
    """`document` (an adapter_config.json) naming its base truthfully.

    `base_model_name_or_path` becomes the registered base's reference (pull it with
    `peftreg pull REF`) where the adapter was pushed against one, instead of the path on
    the trainer's machine; and `peftreg_base` records the base's fingerprint and structure
    hash, so a tool (or a later `peftreg push`) can check a base is the one trained on.
    """
    result = dict(document)
    reference = registered_base_name(config)
    if reference is not None:
        result["base_model_name_or_path"] = reference
    base = config.base
    if base.fingerprint or base.structure_hash:
        result[BASE_KEY] = {
            key: value
            for key, value in (
                ("reference", reference),
                ("fingerprint", base.fingerprint),
                ("structure_hash", base.structure_hash),
                ("quantization", base.quantization),
            )
            if value is not None
        }
    return result


def nola_lora_config(config: AdapterConfig) -> dict[str, Any]:
    """The PEFT LoRA adapter_config.json equivalent to a NOLA adapter."""
    source = config.peft_config
    targets = config.targets
    rank = config.rank or max(t.rank for t in targets)
    alpha = config.alpha if config.alpha is not None else float(targets[0].alpha)
    document: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": source.get("task_type"),
        "base_model_name_or_path": config.base.name,
        "revision": source.get("revision"),
        "inference_mode": True,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(t.module for t in targets),
        "fan_in_fan_out": any(t.layer == "conv1d" for t in targets),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {t.module: t.rank for t in targets if t.rank != rank},
        "alpha_pattern": {t.module: t.alpha for t in targets if t.alpha != alpha},
    }
    return document


def _config_bytes(document: Mapping[str, Any]) -> bytes:
    return (json.dumps(dict(document), indent=2, sort_keys=True) + "\n").encode("utf-8")


def write_peft_directory(
    config: AdapterConfig,
    tensors: Path | str | Mapping[str, torch.Tensor],
    out_dir: Path,
    *,
    extra_files: Mapping[str, Path] | None = None,
    replace: bool = False,
) -> str | None:
    """Write `out_dir` as a PEFT directory; a note to print (NOLA, MoRA) or None.

    `tensors` is the stored tensors file (adapter_model.safetensors, or
    nola.safetensors for NOLA) or a dict of tensors. `extra_files` (title ->
    path, e.g. README.md) are copied alongside.
    """
    note: str | None = None
    if config.kind == "nola":
        lora = materialize(config, tensors if isinstance(tensors, Mapping) else Path(tensors))
        document = truthful_base(config, nola_lora_config(config))
        source: Path | Mapping[str, torch.Tensor] = lora
        note = NOLA_NOTE
    else:
        document = truthful_base(config, config.peft_config)
        source = tensors if isinstance(tensors, Mapping) else Path(tensors)
        note = MORA_NOTE if config.kind == "mora" else None
        if isinstance(source, Path):
            read_safetensors_header(source)
    extras = dict(extra_files or {})
    for title in extras:
        if title in (CONFIG_FILE, TENSORS_FILE):
            raise PeftImportError(f"extra file {title!r} would replace the adapter itself")

    def writer(staging: Path) -> None:
        (staging / CONFIG_FILE).write_bytes(_config_bytes(document))
        if isinstance(source, Path):
            shutil.copyfile(source, staging / TENSORS_FILE)
        else:
            save_file(
                {name: value.contiguous() for name, value in source.items()},
                str(staging / TENSORS_FILE),
                metadata={"format": "pt"},
            )
        for title, path in extras.items():
            dest = staging / title
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)

    write_directory(out_dir, writer, replace=replace)
    return note
