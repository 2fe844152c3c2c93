"""An adapter's effective low-rank factors, and the weight changes they make.

The one place the LoRA family's math is written; merge (jobs and `peftreg
merge`) and hot-swap both use it.

- scaling = alpha / r, or alpha / sqrt(r) with rsLoRA, per module (resolved at
  import into `TargetModule.scaling`).
- Linear: delta = (B @ A) * scaling, shape (out, in). GPT-2's Conv1D
  (`fan_in_fan_out`) stores its weight as (in, out), so its delta is the
  transpose. Embedding: A is (r, num_embeddings) and B (dim, r), and
  delta = (B @ A).T * scaling, shape (num_embeddings, dim).
- DoRA: with W and delta in (out, in) layout, norm = ||W + delta||_2 over the
  input dimension (one value per output row) and W' = (m / norm)[:, None] * (W + delta).
- NOLA: factors are materialized from seeds and coefficients (see
  `peftreg.adapters.nola`) and checked against the recorded digest first.
- MoRA: `a` and `b` are the one square matrix (peft-mora saves it as lora_A and
  lora_B), scaling 1; the delta is the MoRA operator applied to the identity
  (`peftreg.merge.mora`), of the shape of the weight it merges into, whose in and
  out must give the square's side (`peftreg.adapters.mora.mora_rank`). It is not a
  low-rank product, so a MoRA module merges only (no unmerged hot-swap slot).

Everything is computed in fp32; callers cast once to the output dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from peftreg.adapters.schema import AdapterConfig
from peftreg.sdk.errors import InvalidRequest

PEFT_PREFIX = "base_model.model."
LayerKind = Literal["linear", "conv1d", "embedding"]


class FactorError(InvalidRequest):
    """An adapter whose tensors do not form the factors its config describes."""


@dataclass(frozen=True)
class ModuleFactors:
    """One target module's effective factors, fp32 on the CPU."""

    module: str
    layer: LayerKind
    a: torch.Tensor  # (r, in); embedding: (r, num_embeddings)
    b: torch.Tensor  # (out, r); embedding: (embedding_dim, r)
    scaling: float
    magnitude: torch.Tensor | None = None  # DoRA: (out,)
    bias: torch.Tensor | None = None  # lora_bias: (out,), added times scaling
    mora_type: int | None = None  # MoRA: a = b = the square matrix (see module doc)
    mora_r: int | None = None  # MoRA: the LoRA rank its square's side derives from

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def shape_mismatch(self, shape: tuple[int, ...]) -> str | None:
        """Why these factors cannot change a base weight of `shape`; None when they can."""
        if self.mora_type is None:
            if tuple(shape) == self.weight_shape:
                return None
            return f"the adapter's factors make {list(self.weight_shape)}"
        from peftreg.adapters.mora import MoraError, check_operator, mora_rank

        if len(shape) != 2:
            return "a MoRA module adapts a 2-D Linear weight"
        out_features, in_features = shape
        assert self.mora_r is not None
        side = mora_rank(in_features, out_features, self.mora_r, self.mora_type)
        if side != self.rank:
            return (
                f"the adapter's MoRA square has side {self.rank}, but MoRA of rank "
                f"{self.mora_r} on a {list(shape)} weight has side {side}"
            )
        try:
            check_operator(side, in_features, out_features, self.mora_type)
        except MoraError as exc:
            return str(exc)
        return None

    @property
    def weight_shape(self) -> tuple[int, int]:
        """The shape of the base weight this module's delta adds to."""
        rows, cols = int(self.b.shape[0]), int(self.a.shape[1])
        if self.layer == "linear":
            return rows, cols
        return cols, rows  # conv1d (in, out); embedding (num_embeddings, dim)


def _tensor(tensors: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in tensors:
        raise FactorError(f"the adapter's tensors lack {name}")
    return tensors[name].detach().to("cpu", torch.float32)


def adapter_factors(
    config: AdapterConfig, tensors: Mapping[str, torch.Tensor]
) -> dict[str, ModuleFactors]:
    """module path -> factors, for lora, dora (rsLoRA included), nola and mora adapters.

    `tensors` is the adapter's tensors file as loaded: `adapter_model.safetensors`,
    or `nola.safetensors` for NOLA (materialized and digest-checked here).
    """
    if config.peft_config.get("use_mora") and config.kind != "mora":
        raise FactorError(
            f"a {config.kind} adapter whose adapter_config.json sets use_mora: it is a MoRA "
            "adapter (peft-mora), and its squares are not LoRA factors; push it again"
        )
    if config.kind == "nola":
        from peftreg.adapters.nola import materialize

        tensors = materialize(config, tensors)
    elif config.kind == "mora":
        return _mora_factors(config, tensors)
    elif config.kind not in ("lora", "dora"):
        raise FactorError(f"a {config.kind} adapter has no weight factors to merge or swap")
    factors: dict[str, ModuleFactors] = {}
    for target in config.targets:
        prefix = f"{PEFT_PREFIX}{target.module}"
        if target.layer == "embedding":
            a = _tensor(tensors, f"{prefix}.lora_embedding_A")
            b = _tensor(tensors, f"{prefix}.lora_embedding_B")
        else:
            a = _tensor(tensors, f"{prefix}.lora_A.weight")
            b = _tensor(tensors, f"{prefix}.lora_B.weight")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[0] != target.rank:
            raise FactorError(
                f"{target.module}: A {list(a.shape)} and B {list(b.shape)} are not factors "
                f"of rank {target.rank}"
            )
        magnitude = None
        if config.kind == "dora":
            magnitude = _tensor(tensors, f"{prefix}.lora_magnitude_vector").reshape(-1)
            rows = b.shape[0]
            if magnitude.shape[0] != rows:
                raise FactorError(
                    f"{target.module}: DoRA magnitude has {magnitude.shape[0]} values, "
                    f"not one per output row ({rows})"
                )
        bias_name = f"{prefix}.lora_B.bias"
        bias = _tensor(tensors, bias_name) if bias_name in tensors else None
        factors[target.module] = ModuleFactors(
            target.module, target.layer, a, b, target.scaling, magnitude, bias
        )
    return factors


def _mora_factors(
    config: AdapterConfig, tensors: Mapping[str, torch.Tensor]
) -> dict[str, ModuleFactors]:
    from peftreg.adapters.mora import MoraError, check_shared_values, module_rank

    assert config.mora is not None
    factors: dict[str, ModuleFactors] = {}
    for target in config.targets:
        square = _tensor(tensors, f"{PEFT_PREFIX}{target.module}.lora_A.weight")
        _tensor(tensors, f"{PEFT_PREFIX}{target.module}.lora_B.weight")
        try:
            check_shared_values(lambda name: tensors[name], target.module)
            r = module_rank(config.peft_config, target.module)
        except MoraError as exc:
            raise FactorError(str(exc)) from None
        if (
            target.layer != "linear"
            or square.ndim != 2
            or tuple(square.shape)
            != (
                target.rank,
                target.rank,
            )
        ):
            raise FactorError(
                f"{target.module}: MoRA square {list(square.shape)} is not the "
                f"[{target.rank}, {target.rank}] of a Linear target"
            )
        factors[target.module] = ModuleFactors(
            target.module,
            "linear",
            square,
            square,
            1.0,
            mora_type=config.mora.mora_type,
            mora_r=r,
        )
    return factors


def _mora_delta(
    factors: ModuleFactors, shape: tuple[int, ...], device: torch.device | str
) -> torch.Tensor:
    from peftreg.merge.mora import mora_delta

    assert factors.mora_type is not None
    reason = factors.shape_mismatch(shape)
    if reason is not None:
        raise FactorError(f"{factors.module}: the base weight has shape {list(shape)}: {reason}")
    out_features, in_features = shape
    return mora_delta(factors.a, in_features, out_features, factors.mora_type, device)


def delta_weight(
    factors: ModuleFactors,
    device: torch.device | str = "cpu",
    shape: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """scaling * B @ A in the base weight's layout, fp32 on `device` (MoRA: its operator's
    delta for a weight of `shape`)."""
    if factors.mora_type is not None:
        if shape is None:
            raise FactorError(f"{factors.module}: a MoRA delta needs the base weight's shape")
        return _mora_delta(factors, shape, device)
    a = factors.a.to(device, torch.float32)
    b = factors.b.to(device, torch.float32)
    delta = (b @ a).mul_(factors.scaling)
    return delta if factors.layer == "linear" else delta.T


def add_delta_(
    weight: torch.Tensor, factors: ModuleFactors, mix: float, device: torch.device | str
) -> None:
    """weight += mix * delta in place (fp32, `weight`'s layout), without materializing delta.

    One fused `addmm_` (C += alpha * B @ A) instead of a product, a scale and an add;
    a Conv1D or embedding weight is updated through its (out, in) transpose view.
    """
    if factors.mora_type is not None:
        weight.add_(_mora_delta(factors, tuple(weight.shape), device), alpha=mix)
        return
    a = factors.a.to(device, torch.float32)
    b = factors.b.to(device, torch.float32)
    target = weight if factors.layer == "linear" else weight.T
    target.addmm_(b, a, alpha=factors.scaling * mix)


def dora_row_scale(
    weight_out_in: torch.Tensor, delta_out_in: torch.Tensor, magnitude: torch.Tensor
) -> torch.Tensor:
    """m / ||W + delta||_2 per output row; W and delta in (out, in) layout, fp32."""
    norm = torch.linalg.norm(weight_out_in + delta_out_in, dim=1)
    scale: torch.Tensor = magnitude.to(norm.device, torch.float32) / norm
    return scale


def merged_weight(
    weight: torch.Tensor,
    contributions: Sequence[tuple[ModuleFactors, float]],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """W + sum_i w_i * delta_i in fp32 (DoRA: rescaled rows), in `weight`'s layout.

    A DoRA module is not linear in its delta, so it merges only alone with weight 1.
    """
    result = weight.to(device, torch.float32, copy=True)
    for factors, mix in contributions:
        reason = factors.shape_mismatch(tuple(result.shape))
        if reason is not None:
            raise FactorError(
                f"{factors.module}: the base weight has shape {list(result.shape)} but {reason}"
            )
        if factors.magnitude is not None and (len(contributions) != 1 or mix != 1.0):
            raise FactorError(
                f"{factors.module}: a DoRA adapter merges only alone with weight 1, not in a "
                "weighted sum"
            )
    for factors, mix in contributions:
        if factors.magnitude is None:
            add_delta_(result, factors, mix, device)
            continue
        delta = delta_weight(factors, device)
        transposed = factors.layer != "linear"
        w = result.T if transposed else result
        d = delta.T if transposed else delta
        scale = dora_row_scale(w, d, factors.magnitude)
        w.add_(d).mul_(scale[:, None])
    return result


def merged_bias(
    bias: torch.Tensor | None,
    contributions: Sequence[tuple[ModuleFactors, float]],
    device: torch.device | str = "cpu",
) -> torch.Tensor | None:
    """The base bias plus each lora_bias times scaling and weight; None when nothing adds."""
    extra = [(f, mix) for f, mix in contributions if f.bias is not None]
    if not extra:
        return bias
    if bias is None:
        raise FactorError(f"{extra[0][0].module}: the adapter has a lora_B bias, the base none")
    result = bias.to(device, torch.float32, copy=True)
    for factors, mix in extra:
        assert factors.bias is not None
        result.add_(factors.bias.to(device), alpha=factors.scaling * mix)
    return result
