"""AdapterHub bottleneck adapters: the tensors a `BottleneckSpec` implies, checked
against a safetensors header and, where given, the base's tensors. Pure; no torch.

AdapterHub names a bottleneck module's tensors
`<layer list>.<i>.<site>.adapters.<name>.<parameter>`, e.g. for Llama
`model.layers.0.output_adapters.adapters.houlsby.adapter_up.weight`, for BERT
`bert.encoder.layer.0.output.adapters.pfeiffer.adapter_up.weight`. One site per layer
for Pfeiffer (`output_adapter`), two for Houlsby (`mh_adapter` too); none in the layers
of `leave_out`. With hidden size H and bottleneck size d = max(1, int(H // reduction
factor)) (the factor of the layer, or the mapping's "default"), a module holds:

- `adapter_down.<k>.weight` (d, H) and `.bias` (d,): k = 1 with `ln_before` (then
  `adapter_norm_before` and `adapter_down.0`, the same LayerNorm, hold (H,) weight and
  bias), else k = 0;
- `adapter_up.weight` (H, d), `adapter_up.bias` (H,);
- `adapter_norm_after.weight` / `.bias` (H,) with `ln_after`;
- `scaling` (1,) for scaling "learned", (H,) for "channel";
- `gate.weight` (1, H), `gate.bias` (1,) with `use_gating`.

The base gives H (its input embedding width) and its layers (the indices under the
layer list's path).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from peftreg.adapters.schema import BottleneckSpec
from peftreg.adapters.validate import EMBEDDING_SUFFIXES, AdapterInvalid

Shapes = Mapping[str, tuple[int, ...]]

_MODULE = re.compile(r"^(?P<prefix>.+?)\.(?P<layer>\d+)\.(?P<site>.+)$")


def bottleneck_size(spec: BottleneckSpec, layer: int) -> int:
    factor = spec.reduction_factor
    if isinstance(factor, dict):
        chosen = factor.get(str(layer), factor.get("default"))
        if chosen is None:
            raise AdapterInvalid(
                f"reduction_factor {factor} has no entry for layer {layer} and no default",
                location="adapter_config.json",
            )
        factor = chosen
    return max(1, int(spec.hidden_size // factor))


def module_parameters(spec: BottleneckSpec, layer: int) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of one bottleneck module in `layer`."""
    hidden, size = spec.hidden_size, bottleneck_size(spec, layer)
    down = 1 if spec.ln_before else 0
    shapes: dict[str, tuple[int, ...]] = {
        f"adapter_down.{down}.weight": (size, hidden),
        f"adapter_down.{down}.bias": (size,),
        "adapter_up.weight": (hidden, size),
        "adapter_up.bias": (hidden,),
    }
    if spec.ln_before:
        for name in ("adapter_norm_before", "adapter_down.0"):
            shapes |= {f"{name}.weight": (hidden,), f"{name}.bias": (hidden,)}
    if spec.ln_after:
        shapes |= {"adapter_norm_after.weight": (hidden,), "adapter_norm_after.bias": (hidden,)}
    if spec.scaling == "learned":
        shapes["scaling"] = (1,)
    elif spec.scaling == "channel":
        shapes["scaling"] = (hidden,)
    if spec.use_gating:
        shapes |= {"gate.weight": (1, hidden), "gate.bias": (1,)}
    return shapes


def split_name(spec: BottleneckSpec, name: str) -> tuple[int, str, str]:
    """(layer, site, parameter) of a bottleneck tensor name of this adapter."""
    marker = f".adapters.{spec.name}."
    module, found, parameter = name.partition(marker)
    parsed = _MODULE.match(module) if found else None
    if parsed is None or parsed["prefix"] != spec.layer_prefix:
        raise AdapterInvalid(
            f"tensor {name!r} is not an AdapterHub bottleneck tensor of adapter "
            f"{spec.name!r} ({spec.layer_prefix}.<layer>.<site>{marker}<parameter>)",
            location=name,
        )
    return int(parsed["layer"]), parsed["site"], parameter


def check_bottleneck(spec: BottleneckSpec, tensors: Shapes, base: Shapes | None) -> None:
    """Raise `AdapterInvalid` unless `tensors` (name -> shape) are exactly the modules
    `spec` describes, and, with `base` (name -> shape), fit the base."""
    sites_wanted = int(spec.mh_adapter) + int(spec.output_adapter)
    if sites_wanted == 0:
        raise AdapterInvalid(
            "a bottleneck adapter needs mh_adapter or output_adapter",
            location="adapter_config.json",
        )
    found: dict[tuple[int, str], dict[str, tuple[int, ...]]] = {}
    for name, shape in sorted(tensors.items()):
        layer, site, parameter = split_name(spec, name)
        found.setdefault((layer, site), {})[parameter] = tuple(shape)
    sites = sorted({site for _layer, site in found})
    if len(sites) != sites_wanted:
        raise AdapterInvalid(
            f"the adapter has modules at {sites}; its config places them at {sites_wanted} "
            "site(s) per layer (mh_adapter, output_adapter)",
            location="adapter_config.json",
        )
    layers = sorted({layer for layer, _site in found})
    if layers != sorted(spec.layers):
        raise AdapterInvalid(
            f"the adapter has modules in layers {layers}, its config says {sorted(spec.layers)}",
            location="adapter_config.json",
        )
    for layer in layers:
        if layer in spec.leave_out:
            raise AdapterInvalid(
                f"layer {layer} holds a module but the config leaves it out",
                location=f"{spec.layer_prefix}.{layer}",
            )
        want = module_parameters(spec, layer)
        for site in sites:
            module = f"{spec.layer_prefix}.{layer}.{site}.adapters.{spec.name}"
            got = found.get((layer, site))
            if got is None:
                raise AdapterInvalid(f"module {module!r} is missing", location=module)
            for parameter in sorted(set(want) | set(got)):
                if parameter not in got:
                    raise AdapterInvalid(f"tensor {module}.{parameter} is missing", location=module)
                if parameter not in want:
                    raise AdapterInvalid(
                        f"tensor {module}.{parameter} is not part of a bottleneck module with "
                        "this config",
                        location=module,
                    )
                if got[parameter] != want[parameter]:
                    raise AdapterInvalid(
                        f"tensor {module}.{parameter} has shape {list(got[parameter])}, the "
                        f"config (hidden size {spec.hidden_size}, bottleneck "
                        f"{bottleneck_size(spec, layer)}) needs {list(want[parameter])}",
                        location=module,
                    )
    if base is not None:
        _check_against_base(spec, base)


def _check_against_base(spec: BottleneckSpec, base: Shapes) -> None:
    embedding = next(
        (
            (name, shape)
            for name, shape in sorted(base.items())
            if name.endswith(EMBEDDING_SUFFIXES) and len(shape) == 2
        ),
        None,
    )
    if embedding is not None and embedding[1][1] != spec.hidden_size:
        raise AdapterInvalid(
            f"the adapter's hidden size is {spec.hidden_size} but the base embedding "
            f"{embedding[0]!r} has shape {list(embedding[1])} (hidden size {embedding[1][1]})",
            location="adapter_config.json",
        )
    prefix = f"{spec.layer_prefix}."
    base_layers = sorted(
        {
            int(head)
            for name in base
            if name.startswith(prefix) and (head := name[len(prefix) :].split(".", 1)[0]).isdigit()
        }
    )
    if not base_layers:
        raise AdapterInvalid(
            f"the base has no layers under {spec.layer_prefix!r}, where the adapter's modules sit",
            location=spec.layer_prefix,
        )
    expected = [layer for layer in base_layers if layer not in spec.leave_out]
    if sorted(spec.layers) != expected:
        raise AdapterInvalid(
            f"the adapter has modules in layers {sorted(spec.layers)}; the base has layers "
            f"{base_layers} (leave_out {sorted(spec.leave_out)}), so it needs {expected}",
            location=spec.layer_prefix,
        )
