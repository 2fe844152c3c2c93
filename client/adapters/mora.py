"""MoRA (Jiang et al. 2024): a square matrix between a fixed compression and decompression.

The reference code is the peft-mora fork (github.com/kongds/MoRA, `peft-mora/src/peft/
tuners/lora/layer.py`). It saves through peft's LoRA: `adapter_config.json` is a LORA
config with `use_mora: true` and `mora_type`, and each adapted Linear saves one square
matrix twice, as `<m>.lora_A.weight` and `<m>.lora_B.weight` (the fork's lora_B *is*
lora_A, so both hold the same values), of size r_hat x r_hat with

    r_hat = int(sqrt((in + out) * r) + 0.5), made even (r_hat // 2 * 2) for type 6,

where r is the module's LoRA rank (`r`, or its `rank_pattern` entry). The fork's scaling
is 1 (lora_alpha is not used). Its forward, on an input x of `in` features:

- the input is padded to a multiple of r_hat with its own first features
  (x ++ x[:pad], pad = -in mod r_hat) and cut into `in_chunks` chunks of r_hat;
- type 1 (sharing): the chunks are summed; the square matrix maps the sum; the
  r_hat outputs are repeated and cut to `out` features;
- type 6 (RoPE): chunk c is rotated as RoPE does at position c (base 10000, the
  rotate-half convention: x * cos + cat(-x[h:], x[:h]) * sin), every chunk is mapped
  by the square matrix, and the outputs are concatenated, cut to `out`, or repeated
  when shorter.

The operator is linear in x, so its weight change is the operator applied to the
identity: delta = apply(I_in).T, shape (out, in); it does not depend on lora_alpha
(the tensor math: `peftreg.merge.mora`; this module needs no torch).
Other `mora_type`s of the fork (2, 3, 4) are not in the paper and are refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from peftreg.adapters.documents import MoraDocument, TargetDocument, target_document
from peftreg.formats.safetensors_header import SafetensorsHeader
from peftreg.sdk.errors import InvalidRequest

MORA_TYPES = (1, 6)
MORA_TYPE_NAMES = {1: "sharing", 6: "RoPE"}


class MoraError(InvalidRequest):
    """A MoRA adapter that does not fit the reference operator; the message says why."""


def mora_rank(in_features: int, out_features: int, r: int, mora_type: int) -> int:
    """The side of the square matrix the fork builds for a Linear with LoRA rank r."""
    side = int(math.sqrt((in_features + out_features) * r) + 0.5)
    return side // 2 * 2 if mora_type == 6 else side


def mora_type_of(peft_config: Mapping[str, Any]) -> int:
    """The config's `mora_type` (the fork's default is 1); refused unless 1 or 6."""
    value = peft_config.get("mora_type", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value not in MORA_TYPES:
        raise MoraError(
            f"mora_type {value!r} is not supported: peftreg implements the paper's MoRA "
            "types 1 (sharing) and 6 (RoPE)"
        )
    return value


def is_mora(peft_config: Mapping[str, Any]) -> bool:
    """Whether a LoRA config was saved by peft-mora with MoRA on (`use_mora: true`)."""
    return bool(peft_config.get("use_mora"))


def check_operator(side: int, in_features: int, out_features: int, mora_type: int) -> None:
    """Refuse the shapes the reference forward cannot run (its padding repeats the input
    once, so the square's side may be at most twice the input width)."""
    if side <= 0 or in_features <= 0 or out_features <= 0:
        raise MoraError(
            f"MoRA needs positive sizes, not side {side}, {in_features}->{out_features}"
        )
    if mora_type == 6 and side % 2:
        raise MoraError(f"MoRA type 6 (RoPE) needs an even square side, not {side}")
    if (-in_features) % side > in_features:
        raise MoraError(
            f"a MoRA square of side {side} cannot compress {in_features} input features "
            "(the reference pads the input with its own first features, at most once)"
        )


PREFIX = "base_model.model."
SQUARE = ".lora_A.weight"
SHARED = ".lora_B.weight"
# LoRA config keys whose meaning the fork's MoRA path ignores or breaks: refused, never
# stored as if they applied.
REFUSED_FEATURES = {
    "use_dora": "the fork cannot combine DoRA with MoRA (its DoRA multiplies the square "
    "matrices as if they were LoRA factors)",
    "fan_in_fan_out": "the fork's MoRA merge does not transpose for Conv1D weights",
    "lora_bias": "MoRA has no lora_B bias",
    "use_qalora": "QA-LoRA's grouped input does not apply to MoRA",
    "alora_invocation_tokens": "aLoRA is not part of the fork",
    "target_parameters": "the fork's MoRA adapts Linear modules only",
    "trainable_token_indices": "the fork's MoRA adapts Linear modules only",
}


def module_rank(peft_config: Mapping[str, Any], module: str) -> int:
    """The LoRA rank r the fork derives `module`'s square from: `rank_pattern` (peft's
    rule, first match of `(.*\\.)?(key)$`) or `r`."""
    import re

    for key, value in (peft_config.get("rank_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return _positive(value, f"rank_pattern[{key!r}]")
    return _positive(peft_config.get("r"), "r")


def _positive(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise MoraError(f"adapter_config.json: MoRA needs a positive integer {what}, not {value!r}")
    return value


def _refusal(peft_config: Mapping[str, Any]) -> str | None:
    if str(peft_config.get("peft_type", "")).upper() != "LORA":
        peft_type = peft_config.get("peft_type")
        return f"use_mora is a LoRA option of peft-mora, but peft_type is {peft_type!r}"
    for key, reason in REFUSED_FEATURES.items():
        if peft_config.get(key):
            return f"{key} is set: {reason}"
    bias = peft_config.get("bias", "none")
    if bias not in (None, "none"):
        return f"bias={bias!r}: the fork's MoRA layers train no bias; save with bias='none'"
    return None


def mora_targets(
    peft_config: Mapping[str, Any], header: SafetensorsHeader
) -> tuple[list[TargetDocument], MoraDocument]:
    """The targets (rank = the square's side) and spec of a peft-mora directory's header.

    Every adapted module has `lora_A.weight` and `lora_B.weight`, both square and of one
    shape (the fork saves its one matrix under both names); values are compared by
    `check_shared_values`.
    """
    refusal = _refusal(peft_config)
    if refusal is not None:
        raise MoraError(f"adapter_config.json has use_mora: {refusal}")
    mora_type = mora_type_of(peft_config)
    alpha = peft_config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise MoraError(f"adapter_config.json: lora_alpha {alpha!r} is not a number")
    targets: list[TargetDocument] = []
    for name, entry in sorted(header.tensors.items()):
        short = name[len(PREFIX) :] if name.startswith(PREFIX) else name
        if "lora_embedding_" in short:
            raise MoraError(
                f"{name}: the fork adapts embeddings with plain LoRA inside a MoRA adapter; "
                "peftreg stores MoRA adapters of Linear modules only"
            )
        if not short.endswith(SQUARE):
            continue
        module = short[: -len(SQUARE)]
        shared = header.tensors.get(f"{PREFIX}{module}{SHARED}")
        if len(entry.shape) != 2 or entry.shape[0] != entry.shape[1]:
            raise MoraError(f"{name}: shape {list(entry.shape)} is not the square MoRA matrix")
        if shared is None or shared.shape != entry.shape or shared.dtype != entry.dtype:
            raise MoraError(
                f"{PREFIX}{module}{SHARED}: peft-mora saves its square matrix as both lora_A "
                f"and lora_B; it must be {entry.dtype} {list(entry.shape)} like {name}"
            )
        side = entry.shape[0]
        if mora_type == 6 and side % 2:
            raise MoraError(f"{name}: MoRA type 6 (RoPE) needs an even side, not {side}")
        module_rank(peft_config, module)  # a usable r
        targets.append(target_document(module, "linear", side, float(alpha), 1.0))
    if not targets:
        raise MoraError("the tensors file holds no MoRA square (lora_A.weight) tensors")
    r = _positive(peft_config.get("r"), "r")
    spec: MoraDocument = {"mora_type": mora_type, "r": r, "r_hat": max(t["rank"] for t in targets)}
    return targets, spec


def check_shared_values(read: Any, module: str) -> None:
    """lora_A and lora_B of `module` hold the same values (`read(name)` gives bytes or an
    array): the fork loads both into one matrix, so two different ones would be
    ambiguous."""
    a, b = read(f"{PREFIX}{module}{SQUARE}"), read(f"{PREFIX}{module}{SHARED}")
    same = a == b if isinstance(a, bytes) else bool((a == b).all())
    if not same:
        raise MoraError(
            f"{module}: lora_A.weight and lora_B.weight differ; peft-mora saves one square "
            "matrix under both names, so this adapter was not saved by it"
        )


__all__ = [
    "MORA_TYPES",
    "MORA_TYPE_NAMES",
    "MoraError",
    "check_operator",
    "check_shared_values",
    "is_mora",
    "module_rank",
    "mora_rank",
    "mora_targets",
    "mora_type_of",
]
