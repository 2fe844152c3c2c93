"""IA3's learned scaling vectors, per module, as peft applies them unmerged.

peft saves one vector `ia3_l` per targeted module: (out, 1) scales the
layer's output (bias included), y' = y * l; (1, in) for a module of
`feedforward_modules` scales its input, y' = layer(x * l). Which of the
two a module is follows peft's own rule (`IA3Model._check_target_module_feedforward`):
a string is a regular expression the module path must match whole, a list
holds suffixes of the path. The vector's shape must agree with that rule.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from peftreg.adapters.factors import PEFT_PREFIX, FactorError

IA3_SUFFIX = ".ia3_l"


@dataclass(frozen=True)
class Ia3Scale:
    """One module's IA3 vector, fp32 on the CPU."""

    module: str
    vector: torch.Tensor  # (out,) or, feedforward, (in,)
    feedforward: bool  # scales the module's input, not its output


def is_feedforward(peft_config: Mapping[str, Any], module: str) -> bool:
    """Whether peft treats `module` as a feedforward module of this IA3 config."""
    modules = peft_config.get("feedforward_modules")
    if isinstance(modules, str):
        return re.fullmatch(modules, module) is not None
    return any(module.endswith(str(suffix)) for suffix in modules or ())


def ia3_scales(
    peft_config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
) -> dict[str, Ia3Scale]:
    """module -> its IA3 vector; FactorError for a tensor that is not an IA3 vector."""
    scales: dict[str, Ia3Scale] = {}
    for name, tensor in tensors.items():
        if not (name.startswith(PEFT_PREFIX) and name.endswith(IA3_SUFFIX)):
            raise FactorError(f"{name} is not an IA3 vector (<module>.ia3_l)")
        module = name[len(PEFT_PREFIX) : -len(IA3_SUFFIX)]
        feedforward = is_feedforward(peft_config, module)
        shape = tuple(tensor.shape)
        if len(shape) != 2 or shape[0 if feedforward else 1] != 1:
            wanted = "(1, in_features)" if feedforward else "(out_features, 1)"
            role = "a feedforward" if feedforward else "an output-scaling"
            raise FactorError(
                f"{name} has shape {list(shape)}; {module} is {role} module, whose vector "
                f"peft shapes {wanted}"
            )
        vector = tensor.detach().to("cpu", torch.float32).reshape(-1).contiguous()
        scales[module] = Ia3Scale(module, vector, feedforward)
    return scales


__all__ = ["IA3_SUFFIX", "Ia3Scale", "ia3_scales", "is_feedforward"]
