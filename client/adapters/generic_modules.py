"""The modules a generic peft type adapts, read from its tensor names (torch-free).

peft saves a tuner layer's parameters as `base_model.model.<module>.<parameter>[.<sub>]`
where `<parameter>` is one of the layer class's `adapter_layer_names` /
`other_param_names`. `PARAMETER_NAMES` lists them per kind, as peft 0.21 defines them
(`tests/adapters/test_generic_modules.py` checks the table against peft's classes, so
a type peft adds or a parameter it renames fails there). The registry has no torch and
no peft: it derives the modules from the header with this table and refuses a config
that records others.

A module is the path before the last segment of a tensor name that is one of the kind's
parameter names. Tensors with no such segment (copies of `modules_to_save`, tensors the
tuner shares, prompt tensors) name no adapted module. UniLoRA saves only its shared
vector, so its modules are not in its tensors and it records none.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from peftreg.adapters.documents import ModuleDocument

PREFIX = "base_model.model."

PARAMETER_NAMES: dict[str, frozenset[str]] = {
    kind: frozenset(names)
    for kind, names in {
        "adalora": (
            "lora_A",
            "lora_B",
            "lora_E",
            "lora_alpha",
            "lora_dropout",
            "lora_embedding_A",
            "lora_embedding_B",
            "r",
            "ranknum",
            "scaling",
        ),
        "adamss": (
            "adamss_A",
            "adamss_B",
            "adamss_newB",
            "exp_avg_ipt_A",
            "exp_avg_ipt_B",
            "exp_avg_unc_A",
            "exp_avg_unc_B",
            "num_subspaces",
            "scatter_index",
            "seg_result",
            "train_subspace_index",
        ),
        "adaption_prompt": (),
        "beft": ("beft_bias",),
        "boft": ("boft_R", "boft_block_num", "boft_block_size", "boft_dropout", "boft_s"),
        "c3a": ("block_size", "c3a_kernel"),
        "cartridge": (),
        "cpt": (),
        "deft": (
            "_cached_merge_factor",
            "deft_P",
            "deft_R",
            "deft_decomposition",
            "deft_dropout",
            "deft_init_scale",
            "deft_para",
            "deft_r",
            "deft_scaling",
        ),
        "delora": ("delora_A", "delora_B", "delora_dropout", "delora_lambda", "delora_w_norm", "r"),
        "fourierft": (
            "fourierft_n_frequency",
            "fourierft_random_loc_seed",
            "fourierft_scaling",
            "fourierft_spectrum",
            "indices",
        ),
        "frod": (
            "frod_U",
            "frod_V",
            "frod_dropout",
            "frod_lambda_l",
            "frod_lambda_s_values",
            "frod_s_indices",
            "frod_s_size",
            "r",
            "runtime_offload_base_weight",
        ),
        "glora": ("glora_A", "glora_B", "glora_C", "glora_D", "glora_E", "r"),
        "gralora": (
            "alpha",
            "gralora_A",
            "gralora_A_general",
            "gralora_B",
            "gralora_B_general",
            "gralora_dropout",
            "gralora_k",
            "hybrid_r",
            "r",
            "scaling",
        ),
        "hira": ("hira_A", "hira_B", "hira_dropout", "hira_embedding_A", "hira_embedding_B", "r"),
        "hra": ("hra_apply_GS", "hra_r", "hra_u"),
        "ia3": ("ia3_l",),
        "lily": ("lily_A", "lily_B", "lily_router", "num_B", "r", "scaling", "stride_A"),
        "ln_tuning": ("ln_tuning_layers",),
        "loha": (
            "alpha",
            "hada_t1",
            "hada_t2",
            "hada_w1_a",
            "hada_w1_b",
            "hada_w2_a",
            "hada_w2_b",
            "module_dropout",
            "r",
            "rank_dropout",
            "rank_dropout_scale",
            "scaling",
        ),
        "lokr": (
            "alpha",
            "lokr_t2",
            "lokr_w1",
            "lokr_w1_a",
            "lokr_w1_b",
            "lokr_w2",
            "lokr_w2_a",
            "lokr_w2_b",
            "module_dropout",
            "r",
            "rank_dropout",
            "rank_dropout_scale",
            "scaling",
        ),
        "miss": ("miss_block", "miss_dropout", "miss_mini_r", "miss_r"),
        "multitask_prompt_tuning": (),
        "oft": ("oft_R", "oft_block_size", "oft_dropout", "oft_embedding_R", "r"),
        "osf": (
            "_osf_S_low_init",
            "_osf_U_high",
            "_osf_U_low_init",
            "_osf_V_high",
            "_osf_V_low_init",
            "effective_rank",
            "osf_svd_params",
        ),
        "peanut": (
            "act_fn",
            "depth",
            "peanut_A",
            "peanut_B",
            "peanut_decoders",
            "peanut_encoders",
            "r",
            "res_num",
            "scaling",
        ),
        "poly": (
            "n_skills",
            "n_splits",
            "n_tasks",
            "poly_lora_A",
            "poly_lora_B",
            "poly_router",
            "poly_type",
            "r",
        ),
        "psoft": (
            "_psoft_A_cache",
            "_psoft_B_cache",
            "ab_svd_init",
            "psoft_R",
            "psoft_alpha",
            "psoft_dropout",
            "psoft_svd",
            "psoft_svd_lowrank_niter",
            "r",
            "random_seed",
            "scaling",
        ),
        "pvera": (
            "pvera_A",
            "pvera_B",
            "pvera_dropout",
            "pvera_generator",
            "pvera_lambda_b",
            "pvera_lambda_d",
            "r",
            "sample_at_inference",
        ),
        "p_tuning": (),
        "randlora": (
            "r",
            "randlora_A",
            "randlora_B",
            "randlora_dropout",
            "randlora_gamma",
            "randlora_lambda",
            "scaling",
        ),
        "road": ("group_size", "road_alpha", "road_theta", "variant"),
        "shadow": (
            "shadow_alpha",
            "shadow_down",
            "shadow_dropout",
            "shadow_r",
            "shadow_up",
            "shadow_update_gate",
            "shadow_update_transform",
        ),
        "shira": ("r", "scaling", "shira_indices", "shira_weight"),
        "supertuning": (
            "supertuning_indices",
            "supertuning_lora_A",
            "supertuning_lora_B",
            "supertuning_lora_alpha",
            "supertuning_lora_dropout",
            "supertuning_rank",
            "supertuning_values",
        ),
        "tinylora": ("tinylora_A", "tinylora_B", "tinylora_P", "tinylora_v"),
        "trainable_tokens": (
            "token_indices",
            "trainable_tokens_delta",
            "trainable_tokens_original",
        ),
        "unilora": (
            "r",
            "unilora_dropout",
            "unilora_indices_A",
            "unilora_indices_B",
            "unilora_scales_A",
            "unilora_scales_B",
            "unilora_theta_d",
        ),
        "vblora": (
            "r",
            "topk",
            "vblora_dropout",
            "vblora_logits_A",
            "vblora_logits_B",
            "vblora_vector_bank",
        ),
        "vera": ("r", "vera_A", "vera_B", "vera_dropout", "vera_lambda_b", "vera_lambda_d"),
        "waveft": (
            "waveft_indices",
            "waveft_n_frequency",
            "waveft_random_loc_seed",
            "waveft_scaling",
            "waveft_spectrum",
            "waveft_use_idwt",
            "waveft_wavelet_family",
        ),
        "xlora": (),
    }.items()
}

# What stands for the rank, per kind: (config key, per-module pattern key); "r" and
# "rank_pattern" where not listed, None where the type has no rank.
RANK_KEYS: dict[str, tuple[str, str | None] | None] = {
    "beft": None,
    "boft": ("boft_block_size", None),
    "c3a": ("block_size", "block_size_pattern"),
    "fourierft": ("n_frequency", "n_frequency_pattern"),
    "frod": None,
    "ia3": None,
    "ln_tuning": None,
    "oft": ("oft_block_size", None),
    "osf": ("effective_rank", "rank_pattern"),
    "road": ("group_size", None),
    "trainable_tokens": None,
    "waveft": ("n_frequency", "n_frequency_pattern"),
}


def is_rank(kind: str) -> bool:
    """Whether the kind's per-module figure is a rank `r` (not a block size or a count
    of frequencies), so that the largest one is the adapter's rank."""
    keys = RANK_KEYS.get(kind, ("r", "rank_pattern"))
    return keys is not None and keys[0] == "r"


def module_of(kind: str, name: str) -> str | None:
    """The adapted module a tensor name belongs to; None when it names none."""
    names = PARAMETER_NAMES.get(kind, frozenset())
    if not name.startswith(PREFIX):
        return None
    segments = name[len(PREFIX) :].split(".")
    for index in range(len(segments) - 1, 0, -1):
        if segments[index] in names:
            return ".".join(segments[:index])
    return None


def _positive_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value > 0:
        return value
    if isinstance(value, list) and value and all(isinstance(v, bool) for v in value):
        return sum(value)  # AdaLoRA's rank_pattern: the mask of the ranks kept
    return None


def module_rank(kind: str, peft_config: dict[str, Any], module: str) -> int | None:
    """The type's rank, or what stands for it, for one module (per-module patterns
    by peft's rule: the first key `k` with `re.match(rf"(.*\\.)?({k})$", module)`)."""
    from peftreg.adapters.peft_import import match_pattern

    keys = RANK_KEYS.get(kind, ("r", "rank_pattern"))
    if keys is None:
        return None
    key, pattern_key = keys
    pattern = peft_config.get(pattern_key) if pattern_key else None
    matched = match_pattern(pattern if isinstance(pattern, dict) else None, module)
    return _positive_int(matched if matched is not None else peft_config.get(key))


def adapted_modules(
    kind: str, peft_config: dict[str, Any], tensor_names: Iterable[str]
) -> list[ModuleDocument]:
    """The modules a generic kind's tensors adapt, sorted, each with its rank."""
    modules = {m for name in tensor_names if (m := module_of(kind, name))}
    return [
        {"module": module, "rank": module_rank(kind, peft_config, module)}
        for module in sorted(modules)
    ]
