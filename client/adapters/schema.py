"""The adapter and base-model config blobs: what an artifact's manifest records.

These documents are the contract between the library (which builds them from
a PEFT directory or a model directory), the registry (which validates and
indexes them at push time) and every consumer (export, merge, hot-swap).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from peftreg.adapters.kinds import (
    ADAPTER_CONFIG_MEDIA_TYPE,
    ADAPTER_KINDS,
    BASE_CONFIG_MEDIA_TYPE,
    FILE_MEDIA_TYPE,
    GENERIC_KINDS,
    JSON_FILE_MEDIA_TYPE,
    NOLA_SAFETENSORS_MEDIA_TYPE,
    SAFETENSORS_MEDIA_TYPE,
    AdapterKind,
    BaseQuantization,
    GenericKind,
    ScalingRule,
    TypedKind,
    layer_media_type,
)


class TensorSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    dtype: str
    shape: tuple[int, ...]


class BaseReference(BaseModel):
    """Which base model an adapter belongs to."""

    name: str | None = Field(default=None, description="base_model_name_or_path, free text")
    fingerprint: str | None = Field(
        default=None, description="sha256 over sorted (name, dtype, shape, data sha256)"
    )
    structure_hash: str | None = Field(default=None, description="the same without data hashes")
    quantization: BaseQuantization = "none"


class TargetModule(BaseModel):
    """One module the adapter changes, with its resolved rank and scaling."""

    module: str = Field(description="module path in the base model, e.g. model.layers.0.q_proj")
    layer: Literal["linear", "conv1d", "embedding"] = "linear"
    rank: int
    alpha: float
    scaling: float


class AdaptedModule(BaseModel):
    """One module a generic peft type adapts (`GENERIC_KINDS`), from its tensor names."""

    module: str = Field(description="module path in the base model, e.g. model.layers.0.q_proj")
    rank: int | None = Field(
        default=None,
        description="the type's rank or what stands for it (r, block size, n_frequency, ...) "
        "resolved for this module; null where the type has none",
    )


class NolaSpec(BaseModel):
    """How NOLA factors are regenerated, and the digest they must hash to."""

    generator: Literal["torch-cpu-mt19937"] = "torch-cpu-mt19937"
    num_basis_a: int
    num_basis_b: int
    init_a: bool = Field(description="A includes a frozen init matrix (reference LLaMA code)")
    factors_digest: str = Field(description="sha256 over the materialized A and B factors")
    materialized_parameters: int
    stored_parameters: int


class MoraSpec(BaseModel):
    """MoRA (peft-mora's LoRA config with `use_mora`): the operator around each square
    matrix. Each target's `rank` is its square's side r_hat (`peftreg.adapters.mora`)."""

    mora_type: Literal[1, 6] = Field(description="1: sharing (sum/repeat); 6: RoPE")
    r: int = Field(description="the LoRA rank r of the config, from which r_hat is derived")
    r_hat: int = Field(description="the largest square side over the targets")


class BottleneckSpec(BaseModel):
    """An AdapterHub bottleneck adapter (`adapters.BnConfig`): what its modules are and
    where they sit. The whole AdapterHub config is kept in `AdapterConfig.peft_config`."""

    style: Literal["houlsby", "pfeiffer", "parallel", "custom"] = Field(
        description="houlsby: after attention and feed-forward (DoubleSeqBnConfig); pfeiffer: "
        "after the feed-forward block only (SeqBnConfig); parallel: is_parallel (ParBnConfig)"
    )
    name: str = Field(description="the adapter's name in AdapterHub (its tensor names hold it)")
    hidden_size: int
    reduction_factor: float | dict[str, float]
    non_linearity: str
    mh_adapter: bool
    output_adapter: bool
    original_ln_before: bool
    original_ln_after: bool
    residual_before_ln: bool | str
    ln_before: bool
    ln_after: bool
    is_parallel: bool
    scaling: float | str
    use_gating: bool
    leave_out: list[int] = Field(default_factory=list)
    layer_prefix: str = Field(description="the module path of the base's layer list")
    layers: list[int] = Field(description="the layers that hold an adapter module")


class AdapterConfig(BaseModel):
    """Config blob of an `application/vnd.peftreg.adapter.v1` artifact."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    kind: AdapterKind
    base: BaseReference
    rank: int | None = Field(default=None, description="largest rank over the targets")
    alpha: float | None = None
    scaling_rule: ScalingRule = "alpha/r"
    targets: list[TargetModule] = Field(default_factory=list)
    modules: list[AdaptedModule] = Field(
        default_factory=list,
        description="the modules a generic peft type adapts (the LoRA family lists targets)",
    )
    dtype: str
    parameters: int
    bytes: int
    tensors: list[TensorSpec]
    peft_config: dict[str, Any] = Field(
        description="the PEFT adapter_config.json as imported, kept for export (for a "
        "bottleneck adapter, AdapterHub's adapter_config.json)"
    )
    nola: NolaSpec | None = None
    mora: MoraSpec | None = None
    bottleneck: BottleneckSpec | None = None
    num_virtual_tokens: int | None = None


class BaseConfig(BaseModel):
    """Config blob of an `application/vnd.peftreg.base.v1` artifact."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    fingerprint: str
    structure_hash: str
    architecture: str | None = None
    model_type: str | None = None
    dtype: str | None = None
    parameters: int
    tensors: list[TensorSpec]


# The kinds and media types are re-exported: they were defined here first.
__all__ = [
    "ADAPTER_CONFIG_MEDIA_TYPE",
    "ADAPTER_KINDS",
    "BASE_CONFIG_MEDIA_TYPE",
    "FILE_MEDIA_TYPE",
    "GENERIC_KINDS",
    "JSON_FILE_MEDIA_TYPE",
    "NOLA_SAFETENSORS_MEDIA_TYPE",
    "SAFETENSORS_MEDIA_TYPE",
    "AdaptedModule",
    "AdapterConfig",
    "AdapterKind",
    "BaseConfig",
    "BaseQuantization",
    "BaseReference",
    "BottleneckSpec",
    "GenericKind",
    "MoraSpec",
    "NolaSpec",
    "ScalingRule",
    "TargetModule",
    "TensorSpec",
    "TypedKind",
    "layer_media_type",
]
