"""Adapter kinds and the media types of adapter artifacts: plain names, no models.

The push of a PEFT directory reads these without loading pydantic
(`peftreg.adapters.documents`); `peftreg.adapters.schema` re-exports them with
the models that validate the config blobs.
"""

from __future__ import annotations

from typing import Literal, get_args

from peftreg import media_types

ADAPTER_CONFIG_MEDIA_TYPE = media_types.ADAPTER_CONFIG_MEDIA_TYPE  # defined with the manifest's

BASE_CONFIG_MEDIA_TYPE = "application/vnd.peftreg.base.config.v1+json"
SAFETENSORS_MEDIA_TYPE = "application/vnd.peftreg.safetensors"
NOLA_SAFETENSORS_MEDIA_TYPE = "application/vnd.peftreg.nola.safetensors"
JSON_FILE_MEDIA_TYPE = "application/json"
FILE_MEDIA_TYPE = "application/octet-stream"


def layer_media_type(title: str) -> str:
    """The media type of a model or adapter directory's file, by its name."""
    if title.endswith(".safetensors"):
        return SAFETENSORS_MEDIA_TYPE
    if title.endswith(".json"):
        return JSON_FILE_MEDIA_TYPE
    return FILE_MEDIA_TYPE


# The LoRA family and the prompt types have their own typed path (targets with rank
# and scaling; virtual tokens); every other type of peft is stored typed by the generic
# path (`peftreg.adapters.peft_import`): its kind is its peft_type in lower case.
# "bottleneck" is AdapterHub's bottleneck adapter (Houlsby, Pfeiffer; no peft type):
# see `peftreg.adapters.adapterhub`.
TypedKind = Literal["lora", "dora", "prompt_tuning", "prefix_tuning", "nola", "mora", "bottleneck"]
GenericKind = Literal[
    "adalora",
    "adamss",
    "adaption_prompt",
    "beft",
    "boft",
    "c3a",
    "cartridge",
    "cpt",
    "deft",
    "delora",
    "fourierft",
    "frod",
    "glora",
    "gralora",
    "hira",
    "hra",
    "ia3",
    "lily",
    "ln_tuning",
    "loha",
    "lokr",
    "miss",
    "multitask_prompt_tuning",
    "oft",
    "osf",
    "p_tuning",
    "peanut",
    "poly",
    "psoft",
    "pvera",
    "randlora",
    "road",
    "shadow",
    "shira",
    "supertuning",
    "tinylora",
    "trainable_tokens",
    "unilora",
    "vblora",
    "vera",
    "waveft",
    "xlora",
]
AdapterKind = TypedKind | GenericKind
GENERIC_KINDS: frozenset[str] = frozenset(get_args(GenericKind))
# Every adapter kind, the typed ones first (a flat tuple: `get_args(AdapterKind)` gives
# the two Literal types, not their values).
ADAPTER_KINDS: tuple[str, ...] = (*get_args(TypedKind), *sorted(GENERIC_KINDS))
ScalingRule = Literal["alpha/r", "alpha/sqrt(r)", "none"]
# The quantization of the base weights the adapter was trained against.
BaseQuantization = Literal["none", "nf4", "fp4", "int8", "int4"]
