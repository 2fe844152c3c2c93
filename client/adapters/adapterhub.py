"""AdapterHub (`adapters` library) adapter directories: import, and export back.

`model.save_adapter(dir, name, use_safetensors=True)` writes `adapter_config.json`
(AdapterHub's full config: `config`, `name`, `hidden_size`, `model_class`, `version`
"adapters.x.y.z", ...) and `adapter.safetensors`. Without `use_safetensors=True` it
writes `pytorch_adapter.bin`, a pickle, which peftreg never loads: such a directory is
refused with the fix.

- LoRA (`config.architecture == "lora"`) becomes a PEFT LoRA, exactly: the tensors
  `<module>.loras.<name>.lora_A` / `.lora_B` are renamed
  `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (bytes unchanged; the
  layouts (r, in) and (out, r) are peft's), `r` -> `r`, `alpha` -> `lora_alpha`
  (scaling alpha / r in both; alpha = r for LoRAs saved by adapters < 1.1.0, as
  AdapterHub's loader does), `dropout` -> `lora_dropout`, and the modules that hold
  factors (what `selfattn_lora` + `attn_matrices`, `intermediate_lora`, `output_lora`
  and `leave_out` chose) -> `target_modules`. AdapterHub's config is kept in the PEFT
  config under `peftreg_adapterhub`, so `pull --format adapterhub` writes it back.
  AdapterHub's (IA)^3 (`composition_mode: "scale"`, r = 1) becomes peft's IA3 the
  same way: each target's output (bias included) multiplied by a vector, AdapterHub's
  `lora_B` (out, 1) renamed `base_model.model.<module>.ia3_l` with no feed-forward
  modules; only with `alpha` 1 (AdapterHub multiplies by alpha too, peft does not).
  Refused, having no PEFT form: `use_gating` (an input-dependent gate), `use_dora`,
  `vera_d` / `vera_b` (VeRA); other architectures (multi-task LoRA, prefix and
  prompt tuning, ReFT, unions) are refused by name.
- Bottleneck adapters (`BnConfig`, no `config.architecture`: Houlsby, Pfeiffer, ...)
  are stored as kind "bottleneck": a `BottleneckSpec` records the config, the tensors
  are kept as AdapterHub wrote them (`adapter.safetensors`) and AdapterHub's
  `adapter_config.json` is the config's `peft_config`. Checked against the spec at
  import and against the base at push (`peftreg.adapters.bottleneck`). Refused:
  PHM layers (`phm_layer`) and invertible adapters (`inv_adapter`), which peftreg does
  not describe.

`save_adapter` also writes the model's head (`head_config.json`,
`model_head.safetensors`). A static head (`head_config.json` with `"config": null`: a
`...ForCausalLM` model's own output layer) is the base's, not the adapter's, and is
not stored; a flexible head (`...AdapterModel` with a head config) is kept with the
adapter and written back by `pull --format adapterhub`.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import TYPE_CHECKING, Any

from peftreg.adapters.peft_import import (
    CONFIG_FILE,
    PEFT_PREFIX,
    TENSORS_FILE,
    ImportedAdapter,
    PeftImportError,
    PickleRefused,
    pickle_files,
    read_peft_directory,
    read_safetensors_header,
)
from peftreg.adapters.safetensors_rename import write_renamed
from peftreg.formats.safetensors_header import SafetensorsHeader

if TYPE_CHECKING:  # the models load where a bottleneck adapter is imported or exported
    from peftreg.adapters.schema import AdapterConfig, BottleneckSpec

WEIGHTS_FILE = "adapter.safetensors"
PICKLE_WEIGHTS_FILE = "pytorch_adapter.bin"
HEAD_CONFIG_FILE = "head_config.json"
HEAD_WEIGHTS_FILE = "model_head.safetensors"
PROVENANCE_KEY = "peftreg_adapterhub"

_LORA_TENSOR = re.compile(r"^(?P<module>.+)\.loras\.(?P<name>[^.]+)\.(?P<factor>lora_[AB])$")


class AdapterHubImportError(PeftImportError):
    """An AdapterHub directory peftreg cannot import; the message says why."""


def _load_document(path: Path) -> dict[str, Any] | None:
    try:
        document = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return document if isinstance(document, dict) else None


def _is_adapterhub_document(document: dict[str, Any] | None) -> bool:
    """AdapterHub's full config: the method config under `config`, the adapter's `name`
    and the model it was saved from; PEFT's adapter_config.json has `peft_type` instead."""
    return (
        document is not None
        and "peft_type" not in document
        and isinstance(document.get("config"), dict)
        and isinstance(document.get("name"), str)
        and ("model_class" in document or str(document.get("version")).startswith("adapters."))
    )


def is_adapterhub_directory(path: Path) -> bool:
    """`adapter_config.json` in AdapterHub's shape with `adapter.safetensors` (or the
    pickle `pytorch_adapter.bin`, refused on import)."""
    if not path.is_dir() or not (path / CONFIG_FILE).is_file():
        return False
    if not ((path / WEIGHTS_FILE).is_file() or (path / PICKLE_WEIGHTS_FILE).is_file()):
        return False
    return _is_adapterhub_document(_load_document(path))


def pickle_message(title: str) -> str:
    return (
        f"{title} is a pickle file and is never loaded; save the adapter with "
        f"model.save_adapter(DIR, NAME, use_safetensors=True) ({WEIGHTS_FILE}) and remove "
        f"{title}"
    )


def read_adapterhub_directory(path: Path, staging: Path) -> ImportedAdapter:
    """Import an AdapterHub directory; a LoRA is converted into `staging` (a PEFT
    directory, which must outlive the returned adapter's use)."""
    path = Path(path)
    pickles = pickle_files(path)
    if pickles:
        raise PickleRefused(pickle_message(pickles[0]))
    document = _load_document(path)
    if document is None or not _is_adapterhub_document(document):
        raise AdapterHubImportError(f"{path / CONFIG_FILE} is not an AdapterHub adapter config")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterHubImportError(f"{path} has {CONFIG_FILE} but no {WEIGHTS_FILE}")
    header = read_safetensors_header(weights)
    architecture = document["config"].get("architecture")
    if architecture == "lora":
        return _import_lora(path, document, weights, header, staging)
    if architecture is None:  # AdapterHub's bottleneck configs (BnConfig) name none
        return _import_bottleneck(path, document, header)
    raise AdapterHubImportError(
        f"AdapterHub architecture {architecture!r} is not supported; peftreg imports "
        "AdapterHub LoRA and (IA)^3 (as peft's LORA and IA3) and bottleneck adapters "
        "(Houlsby, Pfeiffer, ...)"
    )


def _is_static_head(path: Path) -> bool:
    try:
        head = json.loads((path / HEAD_CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(head, dict) and head.get("config") is None


def extra_files(path: Path) -> list[tuple[str, Path]]:
    """(title, path) of the files kept beside the adapter: all but its config and
    weights, and a static head's files (the base's own output layer)."""
    skipped = {CONFIG_FILE, WEIGHTS_FILE}
    if _is_static_head(path):
        skipped |= {HEAD_CONFIG_FILE, HEAD_WEIGHTS_FILE}
    return [
        (title, item)
        for item in sorted(path.rglob("*"))
        if item.is_file() and (title := item.relative_to(path).as_posix()) not in skipped
    ]


@contextmanager
def imported_adapter(path: Path) -> Iterator[ImportedAdapter]:
    """The adapter of a PEFT or AdapterHub directory, valid inside the block."""
    if not is_adapterhub_directory(path):
        yield read_peft_directory(path)
        return
    with TemporaryDirectory(prefix="peftreg-adapterhub-") as staging:
        yield read_adapterhub_directory(path, Path(staging))


# LoRA and (IA)^3 ---------------------------------------------------------------------

# The PEFT name of each AdapterHub factor: LoRA's (r, in) and (out, r) matrices, and
# (IA)^3's (out, 1) vector, which peft's IA3 stores as `ia3_l` of the same shape.
_PEFT_SUFFIXES = {"lora_A": ".lora_A.weight", "lora_B": ".lora_B.weight"}
_IA3_SUFFIX = ".ia3_l"


def _lora_refusal(config: dict[str, Any]) -> str | None:
    mode = config.get("composition_mode", "add")
    if mode not in ("add", "scale"):
        return f"composition_mode {mode!r} is not AdapterHub's add (LoRA) or scale ((IA)^3)"
    if mode == "scale" and config.get("alpha", 1) != 1:
        return (
            f"(IA)^3 (composition_mode 'scale') with alpha {config.get('alpha')} scales its "
            "vectors by alpha, which peft's IA3 has not; save it with alpha=1"
        )
    if config.get("use_gating"):
        return "use_gating adds an input-dependent gate, which a PEFT LoRA has not"
    if config.get("use_dora"):
        return "use_dora (AdapterHub's DoRA) is not imported; save a plain LoRA"
    if config.get("vera_d") is not None or config.get("vera_b") is not None:
        return "vera_d / vera_b make it AdapterHub's VeRA, not a LoRA"
    return None


def _task_type(model_class: Any) -> str | None:
    if not isinstance(model_class, str):
        return None
    for suffix, task in (
        ("ForCausalLM", "CAUSAL_LM"),
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForTokenClassification", "TOKEN_CLS"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
    ):
        if model_class.endswith(suffix):
            return task
    return None


def _number(config: dict[str, Any], key: str) -> float:
    value = config.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise AdapterHubImportError(f"{CONFIG_FILE}: config.{key} must be a number, not {value!r}")
    return float(value)


def peft_name(adapterhub_name: str, name: str, *, ia3: bool = False) -> str:
    """`<module>.loras.<name>.lora_A` -> `base_model.model.<module>.lora_A.weight`
    (lora_B likewise); for (IA)^3, `<module>.loras.<name>.lora_B` ->
    `base_model.model.<module>.ia3_l`."""
    parsed = _LORA_TENSOR.match(adapterhub_name)
    if parsed is None or parsed["name"] != name or (ia3 and parsed["factor"] != "lora_B"):
        what = "(IA)^3 vector" if ia3 else "LoRA factor"
        expected = "lora_B" if ia3 else "lora_A / lora_B"
        raise AdapterHubImportError(
            f"tensor {adapterhub_name!r} is not a {what} of adapter {name!r} "
            f"(<module>.loras.{name}.{expected})"
        )
    suffix = _IA3_SUFFIX if ia3 else _PEFT_SUFFIXES[parsed["factor"]]
    return f"{PEFT_PREFIX}{parsed['module']}{suffix}"


def adapterhub_name(peft_tensor: str, name: str) -> str:
    """The inverse of `peft_name`."""
    suffixes = {**{v: k for k, v in _PEFT_SUFFIXES.items()}, _IA3_SUFFIX: "lora_B"}
    for suffix, factor in suffixes.items():
        if peft_tensor.startswith(PEFT_PREFIX) and peft_tensor.endswith(suffix):
            module = peft_tensor[len(PEFT_PREFIX) : -len(suffix)]
            return f"{module}.loras.{name}.{factor}"
    raise PeftImportError(f"tensor {peft_tensor!r} is not a LoRA factor or (IA)^3 vector")


def _saved_before_1_1(version: Any) -> bool:
    """Whether `version` ("adapters.x.y.z") is older than adapters 1.1.0."""
    prefix = "adapters."
    if not isinstance(version, str) or not version.startswith(prefix):
        return False
    parts = re.findall(r"\d+", version[len(prefix) :])[:2]
    return tuple(int(part) for part in parts) < (1, 1)


def _effective_alpha(document: dict[str, Any]) -> float:
    """The alpha AdapterHub applies: its own, except for LoRAs saved by adapters < 1.1.0
    with alpha != r, whose faulty scaling AdapterHub's loader undoes by using alpha = r
    (adapters PR 770); so does this import."""
    config = document["config"]
    alpha = _number(config, "alpha")
    if _saved_before_1_1(document.get("version")) and alpha != config["r"]:
        return float(config["r"])
    return alpha


def _check_ranks(header: SafetensorsHeader, rank: int) -> None:
    for tensor, entry in sorted(header.tensors.items()):
        axis = 0 if tensor.endswith(".lora_A") else 1
        if len(entry.shape) != 2 or entry.shape[axis] != rank:
            raise AdapterHubImportError(
                f"tensor {tensor!r} has shape {list(entry.shape)}, not rank {rank} on axis "
                f"{axis} (fused projections such as GPT-2's c_attn are not imported)"
            )


def _peft_config(document: dict[str, Any], modules: list[str], ia3: bool) -> dict[str, Any]:
    config = document["config"]
    common = {
        "task_type": _task_type(document.get("model_class")),
        "base_model_name_or_path": document.get("model_name"),
        "inference_mode": True,
        "target_modules": modules,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        PROVENANCE_KEY: document,
    }
    if ia3:
        # AdapterHub scales each target's output (bias included), as peft's IA3 does for
        # modules that are not feed-forward ones.
        return {"peft_type": "IA3", "feedforward_modules": [], "init_ia3_weights": True, **common}
    return {
        "peft_type": "LORA",
        "r": config["r"],
        "lora_alpha": _effective_alpha(document),
        "lora_dropout": _number(config, "dropout") if "dropout" in config else 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        **common,
    }


def _import_lora(
    path: Path,
    document: dict[str, Any],
    weights: Path,
    header: SafetensorsHeader,
    staging: Path,
) -> ImportedAdapter:
    config = document["config"]
    name = document["name"]
    refusal = _lora_refusal(config)
    if refusal is not None:
        raise AdapterHubImportError(f"AdapterHub LoRA {name!r}: {refusal}")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterHubImportError(f"{CONFIG_FILE}: config.r must be a positive integer")
    ia3 = config.get("composition_mode", "add") == "scale"
    renamed = {tensor: peft_name(tensor, name, ia3=ia3) for tensor in header.tensors}
    if not renamed:
        raise AdapterHubImportError(f"{WEIGHTS_FILE} holds no tensors")
    _check_ranks(header, rank)
    marker = _IA3_SUFFIX if ia3 else _PEFT_SUFFIXES["lora_A"]
    modules = sorted(
        target[len(PEFT_PREFIX) : -len(marker)]
        for target in renamed.values()
        if target.endswith(marker)
    )
    peft_config = _peft_config(document, modules, ia3)
    (staging / CONFIG_FILE).write_text(
        json.dumps(peft_config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    write_renamed(
        weights, header, staging / TENSORS_FILE, renamed.__getitem__, metadata={"format": "pt"}
    )
    for title, item in extra_files(path):
        (staging / title).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(item, staging / title)
    return read_peft_directory(staging)


# Bottleneck -------------------------------------------------------------------------

_REFUSED_BOTTLENECK = {
    "phm_layer": "PHM layers (phm_layer)",
    "inv_adapter": "invertible adapters (inv_adapter)",
}


def _style(config: dict[str, Any]) -> str:
    if config.get("is_parallel"):
        return "parallel"
    if config.get("mh_adapter") and config.get("output_adapter"):
        return "houlsby"
    if config.get("output_adapter") and not config.get("mh_adapter"):
        return "pfeiffer"
    return "custom"


def _bottleneck_spec(document: dict[str, Any], header: SafetensorsHeader) -> BottleneckSpec:
    from peftreg.adapters.bottleneck import split_name
    from peftreg.adapters.schema import BottleneckSpec

    config = document["config"]
    name = document["name"]
    for key, what in _REFUSED_BOTTLENECK.items():
        if config.get(key):
            raise AdapterHubImportError(f"AdapterHub bottleneck {name!r}: {what} not supported")
    hidden = document.get("hidden_size")
    if not isinstance(hidden, int) or hidden < 1:
        raise AdapterHubImportError(f"{CONFIG_FILE}: hidden_size must be a positive integer")
    first = next(iter(sorted(header.tensors)), None)
    if first is None:
        raise AdapterHubImportError(f"{WEIGHTS_FILE} holds no tensors")
    module = first.partition(f".adapters.{name}.")[0]
    matched = re.match(r"^(.+?)\.\d+\.", module + ".")
    if matched is None:
        raise AdapterHubImportError(
            f"tensor {first!r} is not in a numbered layer (<layers>.<i>.<site>.adapters.{name}.)"
        )
    try:
        spec = BottleneckSpec(
            style=_style(config),
            name=name,
            hidden_size=hidden,
            reduction_factor=config.get("reduction_factor"),
            non_linearity=config.get("non_linearity"),
            mh_adapter=bool(config.get("mh_adapter")),
            output_adapter=bool(config.get("output_adapter")),
            original_ln_before=bool(config.get("original_ln_before", False)),
            original_ln_after=bool(config.get("original_ln_after", True)),
            residual_before_ln=config.get("residual_before_ln", True),
            ln_before=bool(config.get("ln_before", False)),
            ln_after=bool(config.get("ln_after", False)),
            is_parallel=bool(config.get("is_parallel", False)),
            scaling=config.get("scaling", 1.0),
            use_gating=bool(config.get("use_gating", False)),
            leave_out=list(config.get("leave_out") or []),
            layer_prefix=matched.group(1),
            layers=[],
        )
    except ValueError as exc:
        raise AdapterHubImportError(f"{CONFIG_FILE}: not a bottleneck config: {exc}") from None
    layers = sorted({split_name(spec, tensor)[0] for tensor in header.tensors})
    return spec.model_copy(update={"layers": layers})


def _import_bottleneck(
    path: Path, document: dict[str, Any], header: SafetensorsHeader
) -> ImportedAdapter:
    from peftreg.adapters.bottleneck import check_bottleneck
    from peftreg.adapters.peft_import import _dominant_dtype
    from peftreg.adapters.schema import AdapterConfig, BaseReference, TensorSpec
    from peftreg.adapters.validate import AdapterInvalid

    try:
        spec = _bottleneck_spec(document, header)
        check_bottleneck(spec, {n: e.shape for n, e in header.tensors.items()}, None)
    except AdapterInvalid as exc:
        raise AdapterHubImportError(f"{path}: {exc.message}") from None
    config = AdapterConfig(
        kind="bottleneck",
        base=BaseReference(name=document.get("model_name")),
        scaling_rule="none",
        dtype=_dominant_dtype(header),
        parameters=sum(e.numel for e in header.tensors.values()),
        bytes=sum(e.nbytes for e in header.tensors.values()),
        tensors=[
            TensorSpec(name=name, dtype=entry.dtype, shape=entry.shape)
            for name, entry in sorted(header.tensors.items())
        ],
        peft_config=document,
        bottleneck=spec,
    )
    return ImportedAdapter.of_config(config, path / WEIGHTS_FILE, WEIGHTS_FILE, extra_files(path))


# Export -----------------------------------------------------------------------------


def adapterhub_document(config: AdapterConfig) -> dict[str, Any]:
    """AdapterHub's adapter_config.json of a stored adapter: a bottleneck adapter's, or
    the one a LoRA or (IA)^3 imported from AdapterHub came with; refused for anything
    else."""
    if config.kind == "bottleneck":
        return dict(config.peft_config)
    source = config.peft_config.get(PROVENANCE_KEY)
    if config.kind in ("lora", "ia3") and _is_adapterhub_document(source):
        assert isinstance(source, dict)
        return dict(source)
    raise PeftImportError(
        f"a {config.kind} adapter has no AdapterHub form: --format adapterhub writes "
        "bottleneck adapters and the LoRA and (IA)^3 adapters imported from AdapterHub"
    )


def export_snapshot_as_adapterhub(
    config: AdapterConfig, snapshot: Path, titles: list[str], output: Path, *, replace: bool
) -> None:
    """Write a pulled adapter snapshot as a directory `model.load_adapter(output,
    use_safetensors=True)` loads: `adapter_config.json` + `adapter.safetensors`."""
    from peftreg.adapters.directory_writer import write_directory

    document = adapterhub_document(config)
    title = WEIGHTS_FILE if config.kind == "bottleneck" else TENSORS_FILE
    if title not in titles:
        raise PeftImportError(f"the adapter artifact has no {title} layer")
    source = snapshot / title
    header = read_safetensors_header(source)
    name = document["name"]

    extras = [t for t in titles if t not in (title, CONFIG_FILE, WEIGHTS_FILE, TENSORS_FILE)]

    def writer(staging: Path) -> None:
        (staging / CONFIG_FILE).write_text(
            json.dumps(document, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        for extra in extras:
            (staging / extra).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(snapshot / extra, staging / extra)
        if config.kind == "bottleneck":
            shutil.copyfile(source, staging / WEIGHTS_FILE)
        else:
            write_renamed(
                source,
                header,
                staging / WEIGHTS_FILE,
                lambda tensor: adapterhub_name(tensor, name),
            )

    write_directory(output, writer, replace=replace)


__all__ = [
    "AdapterHubImportError",
    "export_snapshot_as_adapterhub",
    "imported_adapter",
    "is_adapterhub_directory",
    "read_adapterhub_directory",
]
