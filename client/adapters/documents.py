"""An adapter's config blob as plain JSON data, built without pydantic.

Importing a PEFT directory (`peftreg.adapters.peft_import`) builds the config
document with these functions, and a push uploads it as it is: pydantic and
the models of `peftreg.adapters.schema` (a third of a small push's start-up)
load only where a caller reads `ImportedAdapter.config`, and the registry
validates the blob when it is pushed. Each function fills in what the model
would, with the types it would give: the canonical JSON of a document is that
of the model validated from it and dumped (`model_dump(mode="json")`), so an
adapter gives the same config digest whichever way it was built (the adapter
tests check it for every kind they import).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypedDict

from peftreg.adapters.kinds import AdapterKind, BaseQuantization, ScalingRule

# What the JSON holds for the nested models (`peftreg.adapters.schema`). A bottleneck
# adapter's config is built by the models themselves (`peftreg.adapters.adapterhub`).
NolaDocument = dict[str, Any]
BottleneckDocument = dict[str, Any]


class BaseDocument(TypedDict):
    name: str | None
    fingerprint: str | None
    structure_hash: str | None
    quantization: BaseQuantization


class TargetDocument(TypedDict):
    module: str
    layer: str
    rank: int
    alpha: float
    scaling: float


class ModuleDocument(TypedDict):
    module: str
    rank: int | None


class TensorDocument(TypedDict):
    name: str
    dtype: str
    shape: list[int]


class MoraDocument(TypedDict):
    mora_type: int
    r: int
    r_hat: int


class AdapterDocument(TypedDict):
    schema_version: int
    kind: AdapterKind
    base: BaseDocument
    rank: int | None
    alpha: float | None
    scaling_rule: ScalingRule
    targets: list[TargetDocument]
    modules: list[ModuleDocument]
    dtype: str
    parameters: int
    bytes: int
    tensors: list[TensorDocument]
    peft_config: dict[str, Any]
    nola: NolaDocument | None
    mora: MoraDocument | None
    bottleneck: BottleneckDocument | None
    num_virtual_tokens: int | None


def base_document(
    name: str | None = None,
    fingerprint: str | None = None,
    structure_hash: str | None = None,
    quantization: BaseQuantization = "none",
) -> BaseDocument:
    return {
        "name": name,
        "fingerprint": fingerprint,
        "structure_hash": structure_hash,
        "quantization": quantization,
    }


def target_document(
    module: str, layer: str, rank: int, alpha: float, scaling: float
) -> TargetDocument:
    return {
        "module": module,
        "layer": layer,
        "rank": int(rank),
        "alpha": float(alpha),
        "scaling": float(scaling),
    }


def tensor_document(name: str, dtype: str, shape: Sequence[int]) -> TensorDocument:
    return {"name": name, "dtype": dtype, "shape": [int(side) for side in shape]}


def adapter_document(
    *,
    kind: AdapterKind,
    base: BaseDocument,
    dtype: str,
    parameters: int,
    bytes: int,
    tensors: list[TensorDocument],
    peft_config: Mapping[str, Any],
    rank: int | None = None,
    alpha: float | None = None,
    scaling_rule: ScalingRule = "alpha/r",
    targets: Iterable[TargetDocument] = (),
    modules: Iterable[ModuleDocument] = (),
    nola: NolaDocument | None = None,
    mora: MoraDocument | None = None,
    num_virtual_tokens: int | None = None,
) -> AdapterDocument:
    """The config document, every field present as `AdapterConfig` dumps it."""
    return {
        "schema_version": 1,
        "kind": kind,
        "base": base,
        "rank": rank,
        "alpha": None if alpha is None else float(alpha),
        "scaling_rule": scaling_rule,
        "targets": list(targets),
        "modules": list(modules),
        "dtype": dtype,
        "parameters": parameters,
        "bytes": bytes,
        "tensors": tensors,
        "peft_config": dict(peft_config),
        "nola": nola,
        "mora": mora,
        "bottleneck": None,
        "num_virtual_tokens": num_virtual_tokens,
    }
