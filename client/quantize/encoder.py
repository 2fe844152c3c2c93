"""`Int4Encoder`: the TensorEncoder that writes a compressed-tensors W4A16 checkpoint.

Every weight of a `torch.nn.Linear` module (found with `linear_layers`) whose
input dimension the group size divides becomes three tensors, named as
compressed-tensors' `PackedQuantizationCompressor` names them:

- `<module>.weight_packed` int32 (out, ceil(in / 8)) (`pack.pack_int4`),
- `<module>.weight_scale` (out, in / group_size) in the checkpoint dtype,
- `<module>.weight_shape` int64 [out, in].

Everything else (embeddings, norms, biases, the ignored modules) is stored as
it is, cast to the checkpoint dtype. A Linear the group size does not divide
is left unquantized and listed in `ignore`, because compressed-tensors refuses
such a group split (`_process_group`: "tensor column shape must be divisible");
so is a Linear of the architecture whose weight
never reached `plan` (a tied `lm_head`), so that loaders expect exactly what the
files hold.

Logit bound (tests/quantize/test_int4_checkpoint.py): a tiny random Llama
(hidden 128, 2 layers, vocab 256, intermediate 320), exported at group size
32, 64 or 128 with either algorithm in bf16, fp16 or fp32 and loaded with
`AutoModelForCausalLM.from_pretrained` on CPU, gives logits within a relative
Frobenius error of 0.25 and a max abs error of 0.30 * max |fp32 logit| of the
fp32 model (measured 0.14-0.17 and 0.08-0.20). The loaded model equals the
fp32 model with every quantized Linear replaced by `int4.dequantize` exactly
in fp32, and to the storage dtype's rounding in bf16/fp16.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch

from peftreg.checkpoint.encoding import CastEncoder, PlannedTensor
from peftreg.quantize.errors import QuantizationError, UnquantizableTensor
from peftreg.quantize.int4 import (
    Int4Algorithm,
    quantize_groups,
    validate_algorithm,
    validate_group_size,
)
from peftreg.quantize.linear_layers import is_linear_weight_by_name, linear_layout
from peftreg.quantize.pack import pack_int4, packed_columns
from peftreg.quantize.quantization_config import PACK_QUANTIZED, w4a16_quantization_config

WEIGHT_SUFFIX = ".weight"
DEFAULT_IGNORE: tuple[str, ...] = ("lm_head",)


class Int4Encoder:
    """Symmetric group-wise INT4 (W4A16) in the compressed-tensors `pack-quantized` format.

    `ignore` holds module names or `re:`-prefixed regexes (matched with
    `re.match`), as compressed-tensors reads them. `linear_weights` is the set
    of `<module>.weight` names that are Linear weights (see
    `linear_layers.linear_weight_names`); None falls back to the name heuristic.
    `device` is where the math runs; None runs it where each tensor already is.

    The encoder records what it planned (for `ignore_list` and
    `config_update`), so it describes one checkpoint at a time: a merge calls
    `plan` for every tensor, then `config_update`. A `plan` call after
    `config_update` starts a new checkpoint and forgets the previous one's
    record; one encoder must not serve two merges at the same time.
    """

    def __init__(
        self,
        group_size: int = 128,
        algorithm: Int4Algorithm = "rtn",
        ignore: Sequence[str] = DEFAULT_IGNORE,
        linear_weights: Collection[str] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.group_size = validate_group_size(group_size)
        self.algorithm = validate_algorithm(algorithm)
        self._ignore = list(dict.fromkeys(_ignore_entries(ignore)))
        self._ignore_patterns = [
            _ignore_pattern(entry) for entry in self._ignore if entry.startswith("re:")
        ]
        self._linear_weights = None if linear_weights is None else frozenset(linear_weights)
        self._device = None if device is None else torch.device(device)
        self._passthrough = CastEncoder()
        self._quantized: dict[str, None] = {}
        self._left_unquantized: set[str] = set()
        self._planned_weights: set[str] = set()
        self._planned_tensors = 0
        self._finished = False  # config_update was called: the next plan starts afresh

    @classmethod
    def for_model_config(
        cls,
        config_json: Mapping[str, Any],
        *,
        group_size: int = 128,
        algorithm: Int4Algorithm = "rtn",
        ignore: Sequence[str] = DEFAULT_IGNORE,
        device: torch.device | str | None = None,
    ) -> Int4Encoder:
        """An encoder that knows the architecture's Linear layers from its config.json."""
        layout = linear_layout(config_json)
        if layout is None:
            return cls(group_size, algorithm, ignore, None, device)
        tied = [module for module in sorted(layout.tied_modules) if module not in ignore]
        return cls(group_size, algorithm, [*ignore, *tied], layout.weights, device)

    def plan(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> list[PlannedTensor]:
        if self._finished:
            self._reset()
        self._planned_tensors += 1
        if not self._is_linear_weight(name, shape):
            return self._passthrough.plan(name, shape, dtype)
        module = name.removesuffix(WEIGHT_SUFFIX)
        self._planned_weights.add(name)
        if not self._quantizes(name, shape, dtype):
            if not self._ignored(module):
                self._left_unquantized.add(module)
            return self._passthrough.plan(name, shape, dtype)
        self._quantized[module] = None
        out_features, in_features = shape
        return [
            PlannedTensor(
                f"{module}.weight_packed", torch.int32, (out_features, packed_columns(in_features))
            ),
            PlannedTensor(
                f"{module}.weight_scale", dtype, (out_features, in_features // self.group_size)
            ),
            PlannedTensor(f"{module}.weight_shape", torch.int64, (2,)),
        ]

    def encode(
        self, name: str, tensor: torch.Tensor, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        shape = tuple(tensor.shape)
        if not (self._is_linear_weight(name, shape) and self._quantizes(name, shape, dtype)):
            return self._passthrough.encode(name, tensor, dtype)
        if not tensor.dtype.is_floating_point:
            raise UnquantizableTensor(f"{name}: cannot quantize a {tensor.dtype} tensor")
        device = self._device if self._device is not None else tensor.device
        try:
            q, scale = quantize_groups(
                tensor.to(device=device, dtype=torch.float32),
                self.group_size,
                self.algorithm,
                scale_dtype=dtype,
            )
        except UnquantizableTensor as error:
            raise UnquantizableTensor(f"{name}: {error.message}") from error
        module = name.removesuffix(WEIGHT_SUFFIX)
        return {
            f"{module}.weight_packed": pack_int4(q),
            f"{module}.weight_scale": scale.to(dtype),
            f"{module}.weight_shape": torch.tensor(shape, dtype=torch.int64, device=device),
        }

    @property
    def quantized_modules(self) -> list[str]:
        """Modules planned as quantized so far, in plan order."""
        return list(self._quantized)

    def ignore_list(self) -> list[str]:
        """`quantization_config.ignore`: the given entries, then every Linear left dense."""
        never_planned: set[str] = set()
        if self._linear_weights is not None:
            never_planned = {
                weight.removesuffix(WEIGHT_SUFFIX)
                for weight in self._linear_weights - self._planned_weights
            }
        extra = {
            module for module in self._left_unquantized | never_planned if not self._ignored(module)
        }
        return [*self._ignore, *sorted(extra)]

    def config_update(self) -> dict[str, Any]:
        """The `quantization_config`; refuses a checkpoint in which nothing was quantized."""
        self._finished = True
        if self._planned_tensors and not self._quantized:
            raise QuantizationError(self._nothing_quantized_reason())
        return {
            "quantization_config": w4a16_quantization_config(
                group_size=self.group_size, algorithm=self.algorithm, ignore=self.ignore_list()
            )
        }

    def recipe(self) -> dict[str, Any]:
        return {
            "quantization": "int4",
            "format": PACK_QUANTIZED,
            "group_size": self.group_size,
            "algorithm": self.algorithm,
            "symmetric": True,
            "ignore": self.ignore_list(),
        }

    def _reset(self) -> None:
        self._quantized.clear()
        self._left_unquantized.clear()
        self._planned_weights.clear()
        self._planned_tensors = 0
        self._finished = False

    def _nothing_quantized_reason(self) -> str:
        if self._left_unquantized:
            example = sorted(self._left_unquantized)[0]
            return (
                f"INT4 quantized no tensor: the input dimension of every Linear layer "
                f"(e.g. {example}) is not divisible by the group size {self.group_size}"
            )
        if self._planned_weights:
            return "INT4 quantized no tensor: every Linear layer is in the ignore list"
        return "INT4 quantized no tensor: the checkpoint has no torch.nn.Linear weights"

    def _is_linear_weight(self, name: str, shape: tuple[int, ...]) -> bool:
        if len(shape) != 2 or not name.endswith(WEIGHT_SUFFIX):
            return False
        if self._linear_weights is None:
            return is_linear_weight_by_name(name, shape)
        return name in self._linear_weights

    def _quantizes(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        """A Linear weight that is not ignored, has a float output dtype and whole groups."""
        module = name.removesuffix(WEIGHT_SUFFIX)
        return (
            not self._ignored(module)
            and dtype.is_floating_point
            and shape[1] % self.group_size == 0
            and shape[1] > 0
        )

    def _ignored(self, module: str) -> bool:
        return module in self._ignore or any(
            pattern.match(module) for pattern in self._ignore_patterns
        )


def _ignore_entries(ignore: Sequence[str]) -> list[str]:
    if isinstance(ignore, str) or not all(isinstance(entry, str) for entry in ignore):
        raise QuantizationError("ignore must be a list of module names or 're:' patterns")
    return list(ignore)


def _ignore_pattern(entry: str) -> re.Pattern[str]:
    try:
        return re.compile(entry.removeprefix("re:"))
    except re.error as error:
        raise QuantizationError(f"ignore entry {entry!r} is not a valid regex: {error}") from error
