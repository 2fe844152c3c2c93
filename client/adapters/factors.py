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

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

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
    """module path -> factors, for lora, dora (rsLoRA included) and nola adapters.

    `tensors` is the adapter's tensors file as loaded: `adapter_model.safetensors`,
    or `nola.safetensors` for NOLA (materialized and digest-checked here).
    """
    if config.kind == "nola":
        from peftreg.adapters.nola import materialize

        tensors = materialize(config, tensors)
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


def delta_weight(factors: ModuleFactors, device: torch.device | str = "cpu") -> torch.Tensor:
    """scaling * B @ A in the base weight's layout, fp32 on `device`."""
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
        if tuple(result.shape) != factors.weight_shape:
            raise FactorError(
                f"{factors.module}: the base weight has shape {list(result.shape)} but the "
                f"adapter's factors make {list(factors.weight_shape)}"
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
