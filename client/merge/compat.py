"""Whether adapters can be merged into a base, decided before any tensor is read.

In order, for the adapters together and then each against the base:

1. prompt and prefix tuning add virtual tokens, not weight changes: nothing
   to merge; a DoRA adapter rescales rows, so it is not linear in its delta
   and merges only alone with weight 1; the other peft types merge with
   peft's own layers (`PEFT_MERGED_KINDS`), alone with weight 1, or are
   refused with the reason (`UNMERGEABLE_KINDS`); PEFT features whose effect
   is not a per-module delta on the stored weights (`UNMERGEABLE_FEATURES`)
   are refused, since merging their factors alone would be silently wrong;
2. adapters that record different base fingerprints (or structure hashes)
   were trained on different bases and are never summed;
3. an adapter that records the base fingerprint it was trained on must match
   the base's: the message quotes both;
4. without a fingerprint, a recorded structure hash must match the base's;
5. without either, each target module's weight must exist in the base with
   the shape the adapter's factors make.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Protocol

from peftreg.adapters.schema import GENERIC_KINDS, AdapterConfig, TargetModule, TensorSpec
from peftreg.adapters.validate import PREFIX as PEFT_PREFIX
from peftreg.merge.errors import IncompatibleBase, MergeError

if TYPE_CHECKING:  # the check reads configs only: the service plans exports without torch
    from peftreg.merge.inputs import AdapterInput

# The prompt-learning types (and LLaMA-Adapter's gated prompts): virtual tokens or key/value
# prefixes, no weight change.
NOTHING_TO_MERGE = (
    "prompt_tuning",
    "prefix_tuning",
    "p_tuning",
    "multitask_prompt_tuning",
    "cpt",
    "cartridge",
    "adaption_prompt",
)
# The other peft types whose layers peft merges into the base weights: merged by peft's
# own layer code, one module at a time (`peftreg.merge.peft_modules`).
PEFT_MERGED_KINDS = frozenset(
    {
        "adalora", "beft", "boft", "c3a", "deft", "delora", "fourierft",
        "glora", "gralora", "hira", "hra", "ia3", "ln_tuning", "loha", "lokr", "miss", "oft",
        "peanut", "pvera", "randlora", "road", "shira", "supertuning",
        "tinylora", "trainable_tokens", "unilora", "vblora", "vera", "waveft",
    }
)  # fmt: skip
# The kinds peftreg's own factor math merges (LoRA and its variants, DoRA, NOLA, MoRA).
FACTOR_MERGED_KINDS = frozenset({"lora", "dora", "nola", "mora"})


def mergeable_kind(kind: str) -> bool:
    """Whether adapters of `kind` can be merged into their base at all (an export offers it)."""
    return kind in FACTOR_MERGED_KINDS or kind in PEFT_MERGED_KINDS


# peft types peft itself cannot merge, or peftreg not one module at a time, and why.
WHOLE_BASE = (
    "peft derives part of its layers from the base weights when it loads the adapter (not "
    "saved with it), which peftreg's module-at-a-time merge does not reproduce; merge it "
    "with peft's merge_and_unload"
)
UNMERGEABLE_KINDS: dict[str, str] = {
    **dict.fromkeys(("adamss", "frod", "osf", "psoft"), WHOLE_BASE),
    "lily": "peft's Lily layers share their adapters across layers and do not merge",
    "poly": "Poly routes each task to a mix of LoRA modules, so no one weight change exists",
    "shadow": "ShadowPEFT's adaptation depends on the input, so it has no weight change",
    "xlora": "X-LoRA mixes LoRA adapters per token with a learned classifier",
}
# AdapterHub's bottleneck adapters (kind "bottleneck"): modules added after a layer.
BOTTLENECK_REASON = (
    "it adds a module (down-projection, nonlinearity, up-projection) after a layer, "
    "which is not a change of any base weight, so it cannot be merged"
)
# adapter_config.json keys (when set) whose adapters a plain weight merge would get wrong.
UNMERGEABLE_FEATURES: dict[str, str] = {
    "alora_invocation_tokens": (
        "an activated LoRA (aLoRA) applies only after its invocation tokens, so merging it "
        "would apply it to every token"
    ),
    "use_qalora": (
        "QALoRA's A factor acts on pooled groups of input features, so B @ A is not the "
        "weight change"
    ),
    "target_parameters": (
        "it adapts raw parameters (e.g. fused MoE experts) that peftreg does not map to "
        "stored weights"
    ),
    "layer_replication": (
        "it duplicates base layers, which a merge into the stored weights cannot express"
    ),
    "trainable_token_indices": (
        "it trains selected embedding rows (trainable tokens) that peftreg does not merge"
    ),
}


class BaseIdentity(Protocol):
    """A `BaseConfig`, or a `BaseLayout` read from headers alone (no fingerprint)."""

    @property
    def fingerprint(self) -> str | None: ...

    @property
    def structure_hash(self) -> str: ...

    @property
    def tensors(self) -> list[TensorSpec]: ...


def base_tensor_name(module: str, suffix: str, names: Collection[str]) -> str | None:
    """The base tensor of `<module>.<suffix>`: the same path, or the path without its
    first component (checkpoints saved without the base-model prefix, e.g. GPT-2's
    `h.0.attn.c_attn.weight` for `transformer.h.0.attn.c_attn`)."""
    exact = f"{module}.{suffix}"
    if exact in names:
        return exact
    _, dot, rest = module.partition(".")
    if dot and f"{rest}.{suffix}" in names:
        return f"{rest}.{suffix}"
    return None


def missing_weight(module: str, *, tied_embeddings: bool) -> str:
    """Why `<module>.weight` cannot be merged: absent, maybe because it is tied."""
    message = f"the base has no tensor {module}.weight for the adapter's target {module}"
    if tied_embeddings:
        message += (
            " (the base ties its output and input embeddings, so the tied weight is stored "
            "once, under the input embedding's name; an adapter on the tied copy cannot be "
            "merged without changing both)"
        )
    return message


def _expected_shape(config: AdapterConfig, target: TargetModule) -> tuple[int, ...] | None:
    """The base weight's shape the factors make, from the recorded tensor specs."""
    if config.kind == "mora":
        return None  # the square's side is checked against the base weight when planned
    specs = {spec.name: spec.shape for spec in config.tensors}
    prefix = f"{PEFT_PREFIX}{target.module}"
    if target.layer == "embedding":
        a, b = specs.get(f"{prefix}.lora_embedding_A"), specs.get(f"{prefix}.lora_embedding_B")
    else:
        a, b = specs.get(f"{prefix}.lora_A.weight"), specs.get(f"{prefix}.lora_B.weight")
    if a is None or b is None or len(a) != 2 or len(b) != 2:
        return None  # NOLA: shapes are only known once materialized (checked then)
    if target.layer == "linear":
        return b[0], a[1]
    return a[1], b[0]


def _check_kinds(adapters: Sequence[AdapterInput]) -> None:
    if not adapters:
        raise MergeError("no adapters to merge")
    for adapter in adapters:
        kind = adapter.config.kind
        if kind in NOTHING_TO_MERGE:
            raise MergeError(
                f"{adapter.name} is a {kind} adapter: it adds virtual tokens, not weight "
                "changes, so there is nothing to merge into the base"
            )
        if kind == "bottleneck":
            raise MergeError(f"{adapter.name} is a bottleneck adapter: {BOTTLENECK_REASON}")
        if kind in GENERIC_KINDS:
            _check_generic(adapter, many=len(adapters) > 1)
        if kind == "dora" and (len(adapters) > 1 or adapter.weight != 1.0):
            raise MergeError(
                f"{adapter.name} is a DoRA adapter: its row rescaling is not linear in the "
                "delta, so it merges only alone with weight 1, not in a weighted sum"
            )


def _check_generic(adapter: AdapterInput, *, many: bool) -> None:
    kind = adapter.config.kind
    reason = UNMERGEABLE_KINDS.get(kind)
    if reason is not None:
        raise MergeError(f"{adapter.name} is a {kind} adapter: {reason}; refusing to merge")
    if kind not in PEFT_MERGED_KINDS:
        raise MergeError(f"{adapter.name} is a {kind} adapter, which peftreg does not merge")
    if many or adapter.weight != 1.0:
        raise MergeError(
            f"{adapter.name} is a {kind} adapter: peft's merge of it is not a delta that "
            "scales or sums, so it merges only alone with weight 1"
        )
    if adapter.config.peft_config.get("modules_to_save"):
        raise MergeError(
            f"{adapter.name} is a {kind} adapter with modules_to_save, which peftreg merges "
            "only for the LoRA family"
        )


def _check_features(adapters: Sequence[AdapterInput]) -> None:
    for adapter in adapters:
        for key, reason in UNMERGEABLE_FEATURES.items():
            if adapter.config.peft_config.get(key):
                raise MergeError(
                    f"{adapter.name} sets {key} in its adapter_config.json: {reason}; "
                    "refusing to merge"
                )


def _check_same_base(adapters: Sequence[AdapterInput]) -> None:
    for attribute in ("fingerprint", "structure_hash"):
        recorded = {
            adapter.name: value
            for adapter in adapters
            if (value := getattr(adapter.config.base, attribute)) is not None
        }
        if len(set(recorded.values())) > 1:
            listing = ", ".join(f"{name}: {value}" for name, value in recorded.items())
            raise IncompatibleBase(
                f"the adapters were trained on different bases (base {attribute} {listing}); "
                "only adapters of one base can be summed"
            )


def check_compatible(
    base: BaseIdentity, adapters: Sequence[AdapterInput], *, tied_embeddings: bool = False
) -> None:
    """Refuse (IncompatibleBase / MergeError) adapters that cannot merge into `base`."""
    _check_kinds(adapters)
    _check_features(adapters)
    _check_same_base(adapters)
    shapes = {spec.name: spec.shape for spec in base.tensors}
    for adapter in adapters:
        recorded = adapter.config.base
        if recorded.fingerprint is not None:
            if base.fingerprint is None:
                raise MergeError(
                    f"{adapter.name} records base fingerprint {recorded.fingerprint}; the base's "
                    "fingerprint must be computed to check it"
                )
            if recorded.fingerprint != base.fingerprint:
                raise IncompatibleBase(
                    f"{adapter.name} was trained on base fingerprint {recorded.fingerprint}, but "
                    f"the base has fingerprint {base.fingerprint}; refusing to merge"
                )
            continue
        if recorded.structure_hash is not None:
            if recorded.structure_hash != base.structure_hash:
                raise IncompatibleBase(
                    f"{adapter.name} was trained on a base with structure hash "
                    f"{recorded.structure_hash}, but the base has structure hash "
                    f"{base.structure_hash}; refusing to merge"
                )
            continue
        for target in adapter.config.targets:
            name = base_tensor_name(target.module, "weight", shapes)
            if name is None:
                raise IncompatibleBase(
                    missing_weight(target.module, tied_embeddings=tied_embeddings)
                )
            expected = _expected_shape(adapter.config, target)
            if expected is not None and tuple(shapes[name]) != expected:
                raise IncompatibleBase(
                    f"{adapter.name}: the base's {name} has shape {list(shapes[name])}, but the "
                    f"adapter's factors for {target.module} make {list(expected)}"
                )


__all__ = [
    "FACTOR_MERGED_KINDS",
    "PEFT_MERGED_KINDS",
    "UNMERGEABLE_FEATURES",
    "UNMERGEABLE_KINDS",
    "BaseIdentity",
    "base_tensor_name",
    "check_compatible",
    "mergeable_kind",
    "missing_weight",
]
