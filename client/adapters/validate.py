"""Adapter validation: does an adapter's safetensors file match its config, and its base?

Pure functions, used by the registry at push time and by the library locally.
`validate_adapter` raises `AdapterInvalid` whose message names the tensor or
module at fault (and both shapes, for a shape that does not fit the base).

PEFT names (adapter name stripped), for a module path `<m>` of the base model
whose weight is the base tensor `<m>.weight`:

- `base_model.model.<m>.lora_A.weight` (r, in), `...lora_B.weight` (out, r),
  `...lora_B.bias` (out,) with `lora_bias`;
- embeddings: `...lora_embedding_A` (r, vocab), `...lora_embedding_B` (dim, r);
- DoRA: `...<m>.lora_magnitude_vector` (out,);
- full copies (`modules_to_save`, saved embedding layers):
  `base_model.model.<m>.weight` / `.bias`, `...<m>.base_layer.weight`;
- trained biases (`bias="lora_only"` / `"all"`): `...<m>.base_layer.bias` of a
  target, and with `"all"` `base_model.model.<m>.bias` of any module;
- prompt tuning / prefix tuning: one tensor `prompt_embeddings`; prefix tuning's
  width is layers * 2 * the key/value width (grouped-query attention);
- NOLA: any tensors under `base_model.model.<m>.` (seeds may be I64);
- MoRA (peft-mora, `use_mora`): `...<m>.lora_A.weight` and `...lora_B.weight`, one
  square matrix saved twice (same values), of the side the fork derives from the
  base Linear's shape (`peftreg.adapters.mora`);
- AdapterHub bottleneck adapters (kind "bottleneck"): AdapterHub's own names, checked
  against the config's `BottleneckSpec` and the base (`peftreg.adapters.bottleneck`);
- the other peft types (`GENERIC_KINDS`): names under `base_model.` or top-level
  prompt tensors, float weights or integer indices, finite values; the config's
  `modules` are exactly those the tensor names adapt (`peftreg.adapters.generic_modules`),
  each of the base's modules when the base is known. Their shapes
  against the base's architecture are checked by the library at `push --base`
  (`peftreg.adapters.peft_layout`), which has torch and peft; the registry has not.

Configs whose tensors do not apply to the base as stored (PiSSA-style inits
saved without conversion, `layer_replication`) are refused first
(`peftreg.adapters.features`).

For GPT-2 style Conv1D (`layer == "conv1d"` or `fan_in_fan_out`) the base
weight is stored (in, out), the LoRA factors keep their (r, in) / (out, r).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peftreg.adapters.features import storage_refusal
from peftreg.adapters.mora import (
    MoraError,
    check_operator,
    check_shared_values,
    is_mora,
    module_rank,
    mora_rank,
    mora_targets,
)
from peftreg.adapters.schema import GENERIC_KINDS, AdapterConfig, BaseConfig, TargetModule
from peftreg.formats.safetensors_header import SafetensorsHeader, TensorEntry
from peftreg.manifest import canonical_json

if TYPE_CHECKING:  # numpy loads when values are first checked, not when the registry starts
    import numpy as np

PREFIX = "base_model.model."
WEIGHT_DTYPES = frozenset({"F32", "F16", "BF16"})
NOLA_INDEX_DTYPES = frozenset({"I64"})
# Indices and masks some peft types save (SHiRA, FRoD, SuperTuning, VB-LoRA, ...).
GENERIC_INDEX_DTYPES = frozenset({"I64", "I32", "I16", "I8", "U8", "BOOL"})
# safetensors dtype -> numpy dtype of its little-endian values (BF16 is widened below).
NUMPY_DTYPES: dict[str, str] = {
    "F32": "<f4",
    "F16": "<f2",
    "F64": "<f8",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "BOOL": "?",
}


EMBEDDING_SUFFIXES = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
    "shared.weight",
)

# (suffix, role); order matters: longer suffixes first.
_ROLES: tuple[tuple[str, str], ...] = (
    (".lora_A.weight", "lora_A"),
    (".lora_B.weight", "lora_B"),
    (".lora_B.bias", "lora_B_bias"),
    (".lora_embedding_A", "lora_embedding_A"),
    (".lora_embedding_B", "lora_embedding_B"),
    (".lora_magnitude_vector", "magnitude"),
    (".base_layer.weight", "full_weight"),
    (".base_layer.bias", "full_bias"),
    (".weight", "full_weight"),
    (".bias", "full_bias"),
)


class AdapterInvalid(ValueError):
    """An adapter that does not match its config or its base; `location` names the culprit."""

    def __init__(self, message: str, *, location: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.location = location


@dataclass(frozen=True)
class _Part:
    module: str
    role: str


def split_tensor_name(name: str) -> _Part | None:
    """(module path, role) of a PEFT LoRA/DoRA tensor name; None when it is not one."""
    if not name.startswith(PREFIX):
        return None
    rest = name[len(PREFIX) :]
    for suffix, role in _ROLES:
        if rest.endswith(suffix) and len(rest) > len(suffix):
            return _Part(rest[: -len(suffix)], role)
    return None


def values_from_bytes(data: bytes, entry: TensorEntry) -> np.ndarray[Any, Any]:
    """A flat array of some of a tensor's raw little-endian values (BF16 widened to
    float32 exactly, so NaN and Inf stay what they are). numpy, not torch: the service
    checks values without the tensor library."""
    import numpy as np

    if entry.dtype == "BF16":
        high = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
        return high.view(np.float32)
    dtype = NUMPY_DTYPES.get(entry.dtype)
    if dtype is None:
        raise AdapterInvalid(
            f"tensor {entry.name!r}: dtype {entry.dtype} cannot be checked", location=entry.name
        )
    return np.frombuffer(data, dtype=dtype)


# Reads the values of one tensor as flat pieces, in order, each of bounded size.
TensorValues = Callable[[str], Iterable["np.ndarray[Any, Any]"]]


def validate_adapter(
    config: AdapterConfig,
    header: SafetensorsHeader,
    read_values: TensorValues,
    base: BaseConfig | None,
) -> None:
    """Raise `AdapterInvalid` on the first problem found; return when the adapter is sound.

    `read_values` yields a tensor's values in bounded flat pieces, so checking
    a large tensor never holds it whole in memory.
    """
    refusal = storage_refusal(config.peft_config)
    if refusal is not None:
        raise AdapterInvalid(refusal, location="adapter_config.json")
    _check_mora_kind(config)
    _check_index(config, header)
    _check_dtypes(config, header)
    if config.kind == "bottleneck":
        _check_values(header, read_values)
        _check_bottleneck(config, header, base)
        return
    if config.kind in ("lora", "dora", "nola", "mora"):
        _check_modules(config, header)
    if config.kind == "mora":
        _check_mora(config, header, read_values)
    if config.kind in GENERIC_KINDS:
        _check_generic_names(header)
        _check_generic_modules(config, header, base)
    _check_values(header, read_values)
    if base is not None and config.kind not in GENERIC_KINDS:
        # The other peft types' tensors are checked against the base's architecture by
        # the library at `push --base` (peft injected on the meta device; needs torch).
        _check_base(config, header, base)


def _check_mora_kind(config: AdapterConfig) -> None:
    """A peft-mora config (`use_mora`) is MoRA and nothing else: as LoRA it is wrong."""
    if is_mora(config.peft_config) != (config.kind == "mora") or (
        (config.kind == "mora") != (config.mora is not None)
    ):
        raise AdapterInvalid(
            f"a {config.kind} adapter whose adapter_config.json "
            f"{'sets' if is_mora(config.peft_config) else 'does not set'} use_mora"
            f"{'' if config.mora is None else ' with a mora spec'}: MoRA adapters (peft-mora's "
            "use_mora) are of kind mora, with their mora spec, and only they",
            location="adapter_config.json",
        )


def _check_mora(
    config: AdapterConfig, header: SafetensorsHeader, read_values: TensorValues
) -> None:
    import numpy as np

    assert config.mora is not None
    try:
        targets, spec = mora_targets(config.peft_config, header)
    except MoraError as exc:
        raise AdapterInvalid(str(exc), location="adapter_config.json") from None
    if spec != config.mora.model_dump() or {t["module"]: t["rank"] for t in targets} != {
        t.module: t.rank for t in config.targets
    }:
        raise AdapterInvalid(
            "the config's mora spec or target sides do not match its adapter_config.json "
            "and tensors",
            location="adapter_config.json",
        )

    def read(name: str) -> np.ndarray[Any, Any]:
        pieces = list(read_values(name))
        return np.concatenate(pieces) if pieces else np.zeros(0)

    for target in targets:
        try:
            check_shared_values(read, target["module"])
        except MoraError as exc:
            raise AdapterInvalid(str(exc), location=target["module"]) from None


def _check_index(config: AdapterConfig, header: SafetensorsHeader) -> None:
    declared = {spec.name: spec for spec in config.tensors}
    for name, entry in sorted(header.tensors.items()):
        spec = declared.get(name)
        if spec is None:
            raise AdapterInvalid(
                f"tensor {name!r} is in the safetensors file but not in the config's tensors",
                location=name,
            )
        if spec.dtype != entry.dtype or tuple(spec.shape) != entry.shape:
            raise AdapterInvalid(
                f"tensor {name!r}: the file has {entry.dtype} {list(entry.shape)}, the config "
                f"declares {spec.dtype} {list(spec.shape)}",
                location=name,
            )
    for name in sorted(set(declared) - set(header.tensors)):
        raise AdapterInvalid(
            f"tensor {name!r} is declared in the config but missing from the safetensors file",
            location=name,
        )


def _check_bottleneck(
    config: AdapterConfig, header: SafetensorsHeader, base: BaseConfig | None
) -> None:
    from peftreg.adapters.bottleneck import check_bottleneck

    if config.bottleneck is None:
        raise AdapterInvalid(
            "a bottleneck adapter's config needs its bottleneck spec", location="bottleneck"
        )
    base_shapes = None if base is None else {s.name: tuple(s.shape) for s in base.tensors}
    tensors = {name: entry.shape for name, entry in header.tensors.items()}
    check_bottleneck(config.bottleneck, tensors, base_shapes)


def _check_generic_names(header: SafetensorsHeader) -> None:
    """peft's names: under `base_model.` (per module, or shared by the tuner), or a
    top-level prompt tensor (`prompt_embeddings`, `prefix_task_cols`, ...)."""
    for name in sorted(header.tensors):
        if not name.startswith("base_model.") and "." in name:
            raise AdapterInvalid(
                f"tensor {name!r} is not a peft adapter tensor name (base_model.<module>."
                "<parameter>, or a top-level prompt tensor)",
                location=name,
            )


def _check_generic_modules(
    config: AdapterConfig, header: SafetensorsHeader, base: BaseConfig | None
) -> None:
    """The recorded modules are those the tensor names adapt (with the ranks the
    adapter_config.json gives them), and with a base, each is a module of the base."""
    from peftreg.adapters.generic_modules import adapted_modules

    want = {
        m["module"]: m["rank"]
        for m in adapted_modules(config.kind, config.peft_config, header.tensors)
    }
    got = {m.module: m.rank for m in config.modules}
    for module in sorted(set(want) | set(got)):
        if module not in got:
            raise AdapterInvalid(
                f"module {module!r} is adapted by the tensors but not in the config's modules",
                location=module,
            )
        if module not in want:
            raise AdapterInvalid(
                f"module {module!r} is in the config's modules but no tensor adapts it",
                location=module,
            )
        if got[module] != want[module]:
            raise AdapterInvalid(
                f"module {module!r}: the config records rank {got[module]}, its "
                f"adapter_config.json gives {want[module]}",
                location=module,
            )
    if len(config.modules) != len(got):
        raise AdapterInvalid("the config's modules list a module twice", location="modules")
    if base is None:
        return
    base_names = [spec.name for spec in base.tensors]
    for module in sorted(got):
        if not any(name.startswith(f"{module}.") for name in base_names):
            raise AdapterInvalid(
                f"module {module!r} is not a module of the base (no tensor under it)",
                location=module,
            )


def _check_dtypes(config: AdapterConfig, header: SafetensorsHeader) -> None:
    for name, entry in sorted(header.tensors.items()):
        allowed = WEIGHT_DTYPES
        if config.kind == "nola":
            allowed = WEIGHT_DTYPES | NOLA_INDEX_DTYPES
        elif config.kind in GENERIC_KINDS:
            allowed = WEIGHT_DTYPES | GENERIC_INDEX_DTYPES
        if entry.dtype not in allowed:
            raise AdapterInvalid(
                f"tensor {name!r}: dtype {entry.dtype} is not supported "
                f"(allowed: {', '.join(sorted(allowed))})",
                location=name,
            )


def _modules_to_save(config: AdapterConfig) -> list[str]:
    value = config.peft_config.get("modules_to_save") or []
    return [str(item) for item in value] if isinstance(value, list) else [str(value)]


def _matches_suffix(module: str, names: list[str]) -> bool:
    return any(module == n or module.endswith("." + n) for n in names)


def _check_modules(config: AdapterConfig, header: SafetensorsHeader) -> None:
    targets = {target.module: target for target in config.targets}
    if not targets:
        raise AdapterInvalid(f"a {config.kind} adapter must declare its target modules")
    saved = _modules_to_save(config)
    roles: dict[str, set[str]] = {module: set() for module in targets}
    for name in sorted(header.tensors):
        if config.kind == "nola":
            module = next((m for m in targets if name.startswith(f"{PREFIX}{m}.")), None)
            if module is None:
                raise AdapterInvalid(
                    f"tensor {name!r} belongs to no declared target module", location=name
                )
            roles[module].add("nola")
            continue
        part = split_tensor_name(name)
        if part is None:
            raise AdapterInvalid(
                f"tensor {name!r} is not a PEFT adapter tensor name "
                f"({PREFIX}<module>.lora_A.weight, ...)",
                location=name,
            )
        if part.role in ("full_weight", "full_bias"):
            if part.module in targets or _matches_suffix(part.module, saved):
                continue
            if part.role == "full_bias" and config.peft_config.get("bias") == "all":
                continue  # bias="all" trains (and saves) every bias of the model
            raise AdapterInvalid(
                f"tensor {name!r} is a full copy of module {part.module!r}, which is neither "
                "a target nor in modules_to_save",
                location=part.module,
            )
        if part.module not in targets:
            raise AdapterInvalid(
                f"tensor {name!r} is for module {part.module!r}, which the config does not "
                "declare as a target",
                location=part.module,
            )
        roles[part.module].add(part.role)
    for module, target in targets.items():
        found = roles[module]
        if config.kind == "nola":
            needed: tuple[str, ...] = ("nola",)
        elif target.layer == "embedding":
            needed = ("lora_embedding_A", "lora_embedding_B")
        else:
            needed = ("lora_A", "lora_B")
        if config.kind == "dora":
            needed += ("magnitude",)
        missing = [role for role in needed if role not in found]
        if missing:
            raise AdapterInvalid(
                f"target module {module!r} has no {' / '.join(missing)} tensor(s)",
                location=module,
            )
        if config.kind != "nola":
            _check_rank(target, header)
        if config.kind != "dora" and "magnitude" in found:
            raise AdapterInvalid(
                f"module {module!r} has a DoRA magnitude vector but the adapter kind is "
                f"{config.kind}",
                location=module,
            )


def _check_rank(target: TargetModule, header: SafetensorsHeader) -> None:
    module = target.module
    for suffix, axis in ((".lora_A.weight", 0), (".lora_embedding_A", 0)):
        entry = header.tensors.get(f"{PREFIX}{module}{suffix}")
        if entry is not None and (len(entry.shape) != 2 or entry.shape[axis] != target.rank):
            raise AdapterInvalid(
                f"module {module!r}: tensor {entry.name!r} has shape {list(entry.shape)}, "
                f"not rank {target.rank} as the config declares",
                location=module,
            )
    for suffix in (".lora_B.weight", ".lora_embedding_B"):
        entry = header.tensors.get(f"{PREFIX}{module}{suffix}")
        if entry is not None and (len(entry.shape) != 2 or entry.shape[1] != target.rank):
            raise AdapterInvalid(
                f"module {module!r}: tensor {entry.name!r} has shape {list(entry.shape)}, "
                f"not rank {target.rank} as the config declares",
                location=module,
            )


def _check_values(header: SafetensorsHeader, read_values: TensorValues) -> None:
    import numpy as np

    for name, entry in sorted(header.tensors.items(), key=lambda item: item[1].begin):
        if entry.dtype not in WEIGHT_DTYPES or entry.numel == 0:
            continue
        non_finite = nan = 0
        for piece in read_values(name):
            finite = np.isfinite(piece)
            if not bool(finite.all()):
                bad = piece[~finite]
                non_finite += int(bad.size)
                nan += int(np.isnan(bad).sum())
        if non_finite:
            what = "NaN" if nan else "Inf"
            raise AdapterInvalid(
                f"tensor {name!r} holds {what} values ({non_finite} non-finite of {entry.numel})",
                location=name,
            )


def _shape_error(module: str, tensor: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
    if got != want:
        raise AdapterInvalid(
            f"module {module!r}: tensor {tensor!r} has shape {list(got)} but the base needs "
            f"{list(want)}",
            location=module,
        )


def _fan_in_fan_out(config: AdapterConfig, target: TargetModule) -> bool:
    return target.layer == "conv1d" or bool(config.peft_config.get("fan_in_fan_out"))


def _embedding_dim(base_shapes: dict[str, tuple[int, ...]]) -> tuple[str, int] | None:
    for name, shape in sorted(base_shapes.items()):
        if name.endswith(EMBEDDING_SUFFIXES) and len(shape) == 2:
            return name, shape[1]
    return None


def _check_base(config: AdapterConfig, header: SafetensorsHeader, base: BaseConfig) -> None:
    base_shapes = {spec.name: tuple(spec.shape) for spec in base.tensors}
    if config.kind in ("prompt_tuning", "prefix_tuning"):
        _check_prompt(config, header, base_shapes)
        return
    for target in config.targets:
        module = target.module
        weight_name = f"{module}.weight"
        weight = base_shapes.get(weight_name)
        if weight is None:
            raise AdapterInvalid(
                f"target module {module!r} does not exist in the base model "
                f"(no tensor {weight_name!r})",
                location=module,
            )
        if config.kind == "nola":
            continue
        if config.kind == "mora":
            _check_mora_base(config, target, weight_name, weight, header)
            continue
        r = target.rank
        if target.layer == "embedding":
            if len(weight) != 2:
                _shape_error(module, weight_name, weight, (0, 0))
            vocab, dim = weight
            expected = {
                "lora_embedding_A": (r, vocab),
                "lora_embedding_B": (dim, r),
                "magnitude": (dim,),
            }
        else:
            if len(weight) != 2:
                raise AdapterInvalid(
                    f"module {module!r}: base weight {weight_name!r} has shape {list(weight)}, "
                    f"not a 2-D {target.layer} weight",
                    location=module,
                )
            out_features, in_features = (
                (weight[1], weight[0]) if _fan_in_fan_out(config, target) else weight
            )
            expected = {
                "lora_A": (r, in_features),
                "lora_B": (out_features, r),
                "lora_B_bias": (out_features,),
                "magnitude": (out_features,),
            }
        for role, shape in expected.items():
            suffix = next(s for s, rl in _ROLES if rl == role)
            name = f"{PREFIX}{module}{suffix}"
            entry = header.tensors.get(name)
            if entry is not None:
                _shape_error(module, name, entry.shape, shape)
    for name, entry in sorted(header.tensors.items()):
        part = split_tensor_name(name)
        if part is None or part.role not in ("full_weight", "full_bias"):
            continue
        base_name = f"{part.module}.{'weight' if part.role == 'full_weight' else 'bias'}"
        want = base_shapes.get(base_name)
        if want is None:
            raise AdapterInvalid(
                f"tensor {name!r} copies module {part.module!r}, which does not exist in the "
                "base model",
                location=part.module,
            )
        _shape_error(part.module, name, entry.shape, want)


def _check_mora_base(
    config: AdapterConfig,
    target: TargetModule,
    weight_name: str,
    weight: tuple[int, ...],
    header: SafetensorsHeader,
) -> None:
    """The square's side is what the fork derives from the base Linear's in and out."""
    assert config.mora is not None
    module = target.module
    if len(weight) != 2:
        raise AdapterInvalid(
            f"module {module!r}: base weight {weight_name!r} has shape {list(weight)}, not a "
            "2-D Linear weight",
            location=module,
        )
    out_features, in_features = weight
    mora_type = config.mora.mora_type
    r = module_rank(config.peft_config, module)
    side = mora_rank(in_features, out_features, r, mora_type)
    for suffix in (".lora_A.weight", ".lora_B.weight"):
        name = f"{PREFIX}{module}{suffix}"
        entry = header.tensors.get(name)
        if entry is not None and entry.shape != (side, side):
            raise AdapterInvalid(
                f"module {module!r}: tensor {name!r} has shape {list(entry.shape)} but the "
                f"base needs [{side}, {side}] (MoRA r_hat = int(sqrt(({in_features} + "
                f"{out_features}) * {r}) + 0.5){', even' if mora_type == 6 else ''}, for "
                f"{weight_name!r} {list(weight)})",
                location=module,
            )
    try:
        check_operator(side, in_features, out_features, mora_type)
    except MoraError as exc:
        raise AdapterInvalid(f"module {module!r}: {exc}", location=module) from None


def _key_value_width(base_shapes: dict[str, tuple[int, ...]]) -> tuple[int, int] | None:
    """(number of layers, key/value width) from the base's separate key projections;
    None for a base without them (fused attention, e.g. GPT-2's c_attn)."""
    widths = {
        shape[0]
        for name, shape in base_shapes.items()
        if name.endswith(".k_proj.weight") and len(shape) == 2
    }
    if len(widths) != 1:
        return None
    layers = sum(1 for name in base_shapes if name.endswith(".k_proj.weight"))
    return layers, widths.pop()


def _check_prompt(
    config: AdapterConfig, header: SafetensorsHeader, base_shapes: dict[str, tuple[int, ...]]
) -> None:
    entry = header.tensors.get("prompt_embeddings")
    if entry is None or len(entry.shape) != 2:
        raise AdapterInvalid(
            "a prompt adapter needs one 2-D tensor 'prompt_embeddings'",
            location="prompt_embeddings",
        )
    embedding = _embedding_dim(base_shapes)
    if embedding is None:
        return
    embedding_name, dim = embedding
    embedding_shape = list(base_shapes[embedding_name])
    if config.kind == "prefix_tuning":
        _check_prefix(config, entry, base_shapes, f"{embedding_name!r} {embedding_shape}", dim)
        return
    token_dim = config.peft_config.get("token_dim")
    if isinstance(token_dim, int) and token_dim != dim:
        raise AdapterInvalid(
            f"prompt adapter token_dim {token_dim} does not match the base embedding "
            f"{embedding_name!r} dimension {dim} (shape {embedding_shape})",
            location="prompt_embeddings",
        )
    width = entry.shape[1]
    if width != dim:
        raise AdapterInvalid(
            f"tensor 'prompt_embeddings' has shape {list(entry.shape)}: token dimension "
            f"{width}, but the base embedding {embedding_name!r} has shape "
            f"{embedding_shape} (dimension {dim})",
            location="prompt_embeddings",
        )


def _check_prefix(
    config: AdapterConfig,
    entry: TensorEntry,
    base_shapes: dict[str, tuple[int, ...]],
    embedding: str,
    hidden: int,
) -> None:
    """Prefix tuning stores per layer a key and a value prefix of the key/value width:
    peft sets `token_dim` to num_key_value_heads * head_dim (the hidden size without
    grouped-query attention), and `prompt_embeddings` to (tokens, layers * 2 * token_dim)."""
    key_value = _key_value_width(base_shapes)
    layers, width = key_value if key_value is not None else (None, hidden)
    what = (
        f"the key/value width {width} of the base's k_proj weights"
        if key_value is not None
        else f"the base embedding {embedding} dimension {hidden}"
    )
    token_dim = config.peft_config.get("token_dim")
    if isinstance(token_dim, int) and token_dim != width:
        raise AdapterInvalid(
            f"prefix adapter token_dim {token_dim} does not match {what}",
            location="prompt_embeddings",
        )
    per_layer = 2 * width
    columns = entry.shape[1]
    expected = None if layers is None else layers * per_layer
    if columns % per_layer != 0 or (expected is not None and columns != expected):
        layers_text = "num_layers" if layers is None else f"{layers} layers"
        raise AdapterInvalid(
            f"tensor 'prompt_embeddings' has shape {list(entry.shape)}: width {columns} is "
            f"not {layers_text} * 2 * {width} for {what}",
            location="prompt_embeddings",
        )


def max_rank(config: AdapterConfig) -> int | None:
    ranks = [target.rank for target in config.targets]
    if ranks:
        return max(ranks)
    return config.rank


def structure_hash_of(tensors: list[tuple[str, str, tuple[int, ...]]]) -> str:
    """The base structure hash (as `peftreg.formats.fingerprint`) from (name, dtype, shape)."""
    ordered = sorted(tensors)
    return (
        "sha256:"
        + hashlib.sha256(canonical_json([[n, d, list(s)] for n, d, s in ordered])).hexdigest()
    )
