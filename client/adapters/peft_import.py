"""Read a PEFT adapter directory into an `AdapterConfig`, never unpickling anything.

A PEFT directory is `adapter_config.json` + `adapter_model.safetensors`
(or, for NOLA, our own `nola.safetensors`; see `peftreg.adapters.nola`).
Pickle files (`.bin`, `.pt`, `.pth`, `.pkl`, ...) are refused by name and
never opened. The safetensors header is parsed by the strict parser before
anything else trusts it; tensor data is not read here.

Targets are resolved from tensor names (`base_model.model.<module>.lora_A.weight`,
`...lora_embedding_A` for embeddings) with the per-module rank and alpha of
`rank_pattern` / `alpha_pattern` (the first key `k` with
`re.match(rf"(.*\\.)?({k})$", module)` wins), and scaling alpha / r, or
alpha / sqrt(r) with rsLoRA.

Every other peft type is imported by the generic path: its kind is its
`peft_type` in lower case (`GENERIC_KINDS`), its rank the config's `r` (or
what stands for it), its adapted modules (with their rank where the type has
one) read from the tensor names (`peftreg.adapters.generic_modules`), and its
`adapter_config.json` is kept whole.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftreg.adapters.documents import (
    AdapterDocument,
    BaseDocument,
    MoraDocument,
    TargetDocument,
    TensorDocument,
    adapter_document,
    base_document,
    target_document,
    tensor_document,
)
from peftreg.adapters.features import storage_refusal
from peftreg.adapters.generic_modules import adapted_modules, is_rank
from peftreg.adapters.kinds import GENERIC_KINDS, AdapterKind
from peftreg.adapters.mora import MoraError, check_shared_values, is_mora, mora_targets
from peftreg.formats.safetensors_header import (
    SafetensorsError,
    SafetensorsHeader,
    read_header,
)
from peftreg.sdk.errors import InvalidRequest

if TYPE_CHECKING:
    from peftreg.adapters.schema import AdapterConfig

CONFIG_FILE = "adapter_config.json"
TENSORS_FILE = "adapter_model.safetensors"
NOLA_FILE = "nola.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
PEFT_PREFIX = "base_model.model."
NOLA_PEFT_TYPE = "NOLA"

_KINDS: dict[str, AdapterKind] = {
    "LORA": "lora",
    "PROMPT_TUNING": "prompt_tuning",
    "PREFIX_TUNING": "prefix_tuning",
    NOLA_PEFT_TYPE: "nola",
}


class PeftImportError(InvalidRequest):
    """A directory that cannot be imported as a PEFT adapter; the message says why."""


class PickleRefused(PeftImportError):
    """The directory holds a pickle file, which peftreg never loads."""


@dataclass(frozen=True)
class ImportedAdapter:
    """An imported directory: its config document and the files to upload.

    `document` is the config blob's JSON (`peftreg.adapters.documents`), what a
    push uploads; `config` is that document validated into the model, made on
    first use (it loads pydantic, which a push does not need).
    """

    document: AdapterDocument
    tensors_path: Path
    tensors_title: str  # adapter_model.safetensors or nola.safetensors
    extra_files: list[tuple[str, Path]] = field(default_factory=list)  # (title, path)

    @classmethod
    def of_config(
        cls,
        config: AdapterConfig,
        tensors_path: Path,
        tensors_title: str,
        extra_files: list[tuple[str, Path]],
    ) -> ImportedAdapter:
        document: AdapterDocument = config.model_dump(mode="json")  # type: ignore[assignment]
        imported = cls(document, tensors_path, tensors_title, extra_files)
        imported.__dict__["config"] = config  # the cached_property's slot
        return imported

    @cached_property
    def config(self) -> AdapterConfig:
        from peftreg.adapters.schema import AdapterConfig

        return AdapterConfig.model_validate(self.document)

    def with_base(self, base: BaseDocument) -> ImportedAdapter:
        """The same adapter recorded against `base` (its name kept where `base` has none)."""
        document = dict(self.document)
        document["base"] = {**base, "name": base["name"] or self.document["base"]["name"]}
        return replace(self, document=document)  # type: ignore[arg-type]


def pickle_message(title: str) -> str:
    return (
        f"{title} is a pickle file and is never loaded; save with safe_serialization=True "
        f"(adapter_model.safetensors) and remove {title}"
    )


def pickle_files(path: Path) -> list[str]:
    """Relative paths of every pickle-format file under `path`, sorted."""
    return sorted(
        item.relative_to(path).as_posix()
        for item in path.rglob("*")
        if item.is_file() and item.suffix.lower() in PICKLE_SUFFIXES
    )


def is_peft_directory(path: Path) -> bool:
    """A directory peftreg pushes as a typed adapter (or must refuse as one).

    `adapter_config.json` with `adapter_model.safetensors` or `nola.safetensors`,
    or with a top-level pickle file in their place (refused on import).
    """
    if not path.is_dir() or not (path / CONFIG_FILE).is_file():
        return False
    if (path / TENSORS_FILE).is_file() or (path / NOLA_FILE).is_file():
        return True
    return any(item.is_file() and item.suffix.lower() in PICKLE_SUFFIXES for item in path.iterdir())


def read_safetensors_header(
    path: Path, reader: Callable[[Path], SafetensorsHeader] | None = None
) -> SafetensorsHeader:
    try:
        if reader is not None:
            return reader(path)
        with path.open("rb") as stream:
            return read_header(stream, path.stat().st_size)
    except SafetensorsError as exc:
        raise PeftImportError(f"{path.name}: {exc}") from None


def match_pattern(pattern: dict[str, Any] | None, module: str) -> Any | None:
    """PEFT's rule: the first key `k` with `re.match(rf"(.*\\.)?({k})$", module)`."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def lora_scaling(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _strip_prefix(name: str) -> str:
    return name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name


def _recorded_base(peft_config: dict[str, Any]) -> dict[str, str]:
    """The base identity a directory exported by peftreg records (`peftreg_base`)."""
    recorded = peft_config.get("peftreg_base")
    if not isinstance(recorded, dict):
        return {}
    return {
        key: value
        for key in ("fingerprint", "structure_hash")
        if isinstance(value := recorded.get(key), str)
    }


def _dominant_dtype(header: SafetensorsHeader) -> str:
    floats = [e.dtype for e in header.tensors.values() if e.dtype.startswith(("F", "BF"))]
    counts = Counter(floats or [e.dtype for e in header.tensors.values()])
    if not counts:
        raise PeftImportError("the tensors file holds no tensors")
    return counts.most_common(1)[0][0]


def _tensor_specs(header: SafetensorsHeader) -> list[TensorDocument]:
    return [
        tensor_document(name, entry.dtype, entry.shape)
        for name, entry in sorted(header.tensors.items())
    ]


def _lora_targets(peft_config: dict[str, Any], header: SafetensorsHeader) -> list[TargetDocument]:
    r_default = peft_config.get("r")
    alpha_default = peft_config.get("lora_alpha")
    if not isinstance(r_default, int) or not isinstance(alpha_default, int | float):
        raise PeftImportError(f"{CONFIG_FILE}: LoRA needs integer r and numeric lora_alpha")
    rslora = bool(peft_config.get("use_rslora"))
    conv1d = bool(peft_config.get("fan_in_fan_out"))
    targets: list[TargetDocument] = []
    for name, entry in sorted(header.tensors.items()):
        short = _strip_prefix(name)
        if short.endswith(".lora_A.weight"):
            module, layer = short[: -len(".lora_A.weight")], "conv1d" if conv1d else "linear"
        elif short.endswith(".lora_embedding_A"):
            module, layer = short[: -len(".lora_embedding_A")], "embedding"
        else:
            continue
        rank = match_pattern(peft_config.get("rank_pattern"), module)
        rank = r_default if rank is None else rank
        alpha = match_pattern(peft_config.get("alpha_pattern"), module)
        alpha = alpha_default if alpha is None else alpha
        if not entry.shape or entry.shape[0] != rank:
            raise PeftImportError(
                f"{name}: shape {list(entry.shape)} does not have the rank {rank} that "
                f"{CONFIG_FILE} gives {module}"
            )
        targets.append(
            target_document(
                module,
                layer,
                int(rank),
                float(alpha),
                lora_scaling(float(alpha), int(rank), rslora),
            )
        )
    if not targets:
        raise PeftImportError(f"{TENSORS_FILE} holds no lora_A / lora_embedding_A tensors")
    return targets


def _generic_kind(peft_type: str) -> AdapterKind | None:
    kind = peft_type.lower()
    return kind if kind in GENERIC_KINDS else None  # type: ignore[return-value]


def _base_name(peft_config: dict[str, Any]) -> str | None:
    name = peft_config.get("base_model_name_or_path")
    if name is not None and not isinstance(name, str):
        raise PeftImportError(f"{CONFIG_FILE}: base_model_name_or_path {name!r} is not a string")
    return name


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _generic_rank(peft_config: dict[str, Any]) -> int | None:
    """The type's rank, or what stands for it, where its config records one."""
    for key in ("r", "rank", "target_r"):
        value = _int_or_none(peft_config.get(key))
        if value is not None:
            return value
    return None


def _mora_parts(
    peft_config: dict[str, Any], header: SafetensorsHeader, tensors_path: Path
) -> tuple[list[TargetDocument], MoraDocument]:
    try:
        targets, spec = mora_targets(peft_config, header)
        with tensors_path.open("rb") as stream:

            def read(name: str) -> bytes:
                start, end = header.absolute_range(name)
                stream.seek(start)
                return stream.read(end - start)

            for target in targets:
                check_shared_values(read, target["module"])
    except MoraError as exc:
        raise PeftImportError(f"{TENSORS_FILE}: {exc}") from None
    return targets, spec


def _load_peft_config(path: Path) -> dict[str, Any]:
    try:
        document = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PeftImportError(f"{CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise PeftImportError(f"{CONFIG_FILE} must hold a JSON object")
    return document


def read_peft_directory(
    path: Path,
    *,
    base_fingerprint: str | None = None,
    base_structure_hash: str | None = None,
    read_header: Callable[[Path], SafetensorsHeader] | None = None,
) -> ImportedAdapter:
    """Import a PEFT directory: config resolved from its JSON and tensor header.

    `read_header` parses the tensors file's header (raising SafetensorsError);
    a caller that goes on to load the file passes one that keeps what it read.
    """
    path = Path(path)
    if not path.is_dir():
        raise PeftImportError(f"{path} is not a directory")
    pickles = pickle_files(path)
    if pickles:
        raise PickleRefused(pickle_message(pickles[0]))
    if not (path / CONFIG_FILE).is_file():
        raise PeftImportError(f"{path} has no {CONFIG_FILE}; it is not a PEFT adapter directory")
    peft_config = _load_peft_config(path)
    peft_type = str(peft_config.get("peft_type", "")).upper()
    # peft-mora saves MoRA as a LoRA config with use_mora; peft itself ignores the key, so
    # it is looked at first: read as plain LoRA it would be silently wrong.
    kind = "mora" if is_mora(peft_config) else _KINDS.get(peft_type) or _generic_kind(peft_type)
    if kind is None:
        raise PeftImportError(
            f"peft_type {peft_config.get('peft_type')!r} is not supported; peftreg imports "
            "NOLA and the peft types of peft 0.21 (LORA, IA3, LOHA, LOKR, VERA, OFT, ...)"
        )
    refusal = storage_refusal(peft_config)
    if refusal is not None:
        raise PeftImportError(f"{path}: {refusal}")
    title = NOLA_FILE if kind == "nola" else TENSORS_FILE
    tensors_path = path / title
    if not tensors_path.is_file():
        raise PeftImportError(f"{path} has {CONFIG_FILE} but no {title}")
    header = read_safetensors_header(tensors_path, read_header)
    recorded = _recorded_base(peft_config)
    base = base_document(
        name=_base_name(peft_config),
        fingerprint=base_fingerprint or recorded.get("fingerprint"),
        structure_hash=base_structure_hash or recorded.get("structure_hash"),
    )
    common: dict[str, Any] = {
        "base": base,
        "dtype": _dominant_dtype(header),
        "parameters": sum(e.numel for e in header.tensors.values()),
        "bytes": sum(e.nbytes for e in header.tensors.values()),
        "tensors": _tensor_specs(header),
        "peft_config": peft_config,
    }
    if kind == "lora":
        targets = _lora_targets(peft_config, header)
        document = adapter_document(
            kind="dora" if peft_config.get("use_dora") else "lora",
            rank=max(t["rank"] for t in targets),
            alpha=float(peft_config["lora_alpha"]),
            scaling_rule="alpha/sqrt(r)" if peft_config.get("use_rslora") else "alpha/r",
            targets=targets,
            **common,
        )
    elif kind == "nola":
        from peftreg.adapters.nola import nola_config_parts

        targets, spec, parameters = nola_config_parts(peft_config, tensors_path, header)
        common["parameters"] = parameters
        document = adapter_document(
            kind="nola",
            rank=max(t["rank"] for t in targets),
            alpha=float(peft_config["lora_alpha"]),
            scaling_rule="alpha/r",
            targets=targets,
            nola=spec,
            **common,
        )
    elif kind == "mora":
        targets, mora = _mora_parts(peft_config, header, tensors_path)
        document = adapter_document(
            kind="mora",
            rank=mora["r_hat"],
            alpha=targets[0]["alpha"],
            scaling_rule="none",
            targets=targets,
            mora=mora,
            **common,
        )
    elif kind in GENERIC_KINDS:
        modules = adapted_modules(kind, peft_config, header.tensors)
        ranks = [rank for m in modules if (rank := m["rank"]) is not None]
        document = adapter_document(
            kind=kind,
            rank=max(ranks) if ranks and is_rank(kind) else _generic_rank(peft_config),
            scaling_rule="none",
            modules=modules,
            num_virtual_tokens=_int_or_none(peft_config.get("num_virtual_tokens")),
            **common,
        )
    else:
        tokens = peft_config.get("num_virtual_tokens")
        if not isinstance(tokens, int):
            raise PeftImportError(f"{CONFIG_FILE}: {peft_type} needs num_virtual_tokens")
        document = adapter_document(
            kind=kind, scaling_rule="none", num_virtual_tokens=tokens, **common
        )
    extras = [
        (item.relative_to(path).as_posix(), item)
        for item in sorted(path.rglob("*"))
        if item.is_file() and item.relative_to(path).as_posix() not in (CONFIG_FILE, title)
    ]
    return ImportedAdapter(document, tensors_path, title, extras)


__all__ = [
    "ImportedAdapter",
    "PeftImportError",
    "PickleRefused",
    "is_peft_directory",
    "read_peft_directory",
]
