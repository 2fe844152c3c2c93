"""PEFT config features that change what an adapter's tensors mean.

Two uses, both on the `adapter_config.json` as saved (`AdapterConfig.peft_config`):

- `storage_refusal`: features whose tensors peftreg cannot apply to the
  registered base as they are, so storing them as a plain adapter would give
  silently wrong numbers everywhere (merge, export, hot-swap). The library
  refuses them at import and the registry at push, each with the fix.
- `variants`: what `show` and `diff` print beside the kind, so that an
  aLoRA, a QA-LoRA or an rsLoRA adapter is not described as plain LoRA.
"""

from __future__ import annotations

from typing import Any

CONVERSION_FIX = (
    "save it with save_pretrained(..., path_initial_model_for_weight_conversion=<directory "
    "of the adapter as initialised, before training>), which writes the equivalent plain LoRA "
    "of rank 2r for the original base, and push that"
)


def _base_changing_init(value: Any) -> str | None:
    """The name of an `init_lora_weights` value that rewrites the base weights on load."""
    if not isinstance(value, str):
        return None
    name = value.lower()
    if name.startswith(("pissa", "corda")) or name in ("olora", "lora_ga", "loftq"):
        return value
    return None


def storage_refusal(peft_config: dict[str, Any]) -> str | None:
    """Why an adapter with this config cannot be stored truthfully; None when it can."""
    init = _base_changing_init(peft_config.get("init_lora_weights"))
    if init is not None and init.lower() == "loftq":
        return (
            "init_lora_weights 'loftq' replaces the base weights with a quantized residual "
            "when peft loads the adapter, so its A/B do not apply to the original base; save "
            "the LoftQ-initialised base model, set init_lora_weights to true before "
            "save_pretrained (as peft's LoftQ example does) and push the adapter against "
            "that base"
        )
    if init is not None:
        return (
            f"init_lora_weights {init!r} was saved without conversion: peft rebuilds a "
            "residual base from that initialisation when it loads the adapter, so its A/B do "
            f"not apply to the original base weights; {CONVERSION_FIX}"
        )
    if peft_config.get("layer_replication"):
        return (
            "layer_replication duplicates base layers, so the adapter's modules do not exist "
            "in the base model as stored; peftreg does not store layer-replicated adapters "
            "(train without layer_replication)"
        )
    return None


def variants(peft_config: dict[str, Any]) -> list[str]:
    """Short names of the features that make an adapter more than its kind says."""
    found: list[str] = []
    if peft_config.get("use_mora"):
        mora_type = peft_config.get("mora_type", 1)
        name = {1: "sharing", 6: "RoPE"}.get(mora_type, "unsupported")
        found.append(f"MoRA type {mora_type}: {name}")
    if peft_config.get("peftreg_adapterhub"):  # peftreg.adapters.adapterhub.PROVENANCE_KEY
        found.append("from AdapterHub")
    if peft_config.get("use_rslora"):
        found.append("rsLoRA")
    if peft_config.get("alora_invocation_tokens"):
        found.append("aLoRA")
    if peft_config.get("use_qalora"):
        found.append(f"QA-LoRA (group size {peft_config.get('qalora_group_size')})")
    if peft_config.get("target_parameters"):
        found.append("target_parameters")
    if peft_config.get("trainable_token_indices"):
        found.append("trainable tokens")
    if peft_config.get("lora_bias"):
        found.append("lora_bias")
    bias = peft_config.get("bias")
    if isinstance(bias, str) and bias != "none":
        found.append(f"bias={bias}")
    if peft_config.get("rank_pattern") or peft_config.get("alpha_pattern"):
        found.append("rank/alpha patterns")
    if peft_config.get("modules_to_save"):
        found.append("modules_to_save")
    init = peft_config.get("init_lora_weights")
    if isinstance(init, str) and init.lower() != "gaussian":
        found.append(f"init {init}")
    return found


__all__ = ["CONVERSION_FIX", "storage_refusal", "variants"]
