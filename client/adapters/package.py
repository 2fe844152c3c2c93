"""Adapter artifacts: what `push` uploads for a PEFT directory, and `pull --format peft`.

An adapter artifact (artifactType ADAPTER_ARTIFACT) has:
- config blob: canonical JSON of the AdapterConfig, ADAPTER_CONFIG_MEDIA_TYPE;
- layers: the tensors file titled `adapter_model.safetensors`
  (SAFETENSORS_MEDIA_TYPE), `nola.safetensors` (NOLA_SAFETENSORS_MEDIA_TYPE) or, for an
  AdapterHub bottleneck adapter, `adapter.safetensors` (SAFETENSORS_MEDIA_TYPE),
  then every other file (README.md, ...) as FILE_MEDIA_TYPE. The PEFT
  `adapter_config.json` is not a layer: it lives in the config's `peft_config`;
- manifest annotations: the title, `io.peftreg.adapter.kind` and
  `io.peftreg.adapter.rank` (when the adapter has a rank).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from peftreg.adapters.kinds import (
    ADAPTER_CONFIG_MEDIA_TYPE,
    FILE_MEDIA_TYPE,
    NOLA_SAFETENSORS_MEDIA_TYPE,
    SAFETENSORS_MEDIA_TYPE,
)
from peftreg.adapters.peft_import import NOLA_FILE, TENSORS_FILE, ImportedAdapter
from peftreg.media_types import TITLE_ANNOTATION, canonical_json
from peftreg.sdk.errors import InvalidRequest

if TYPE_CHECKING:
    from peftreg.adapters.documents import AdapterDocument
    from peftreg.adapters.schema import AdapterConfig
    from peftreg.manifest import ImageManifest

KIND_ANNOTATION = "io.peftreg.adapter.kind"
RANK_ANNOTATION = "io.peftreg.adapter.rank"


def config_blob(config: AdapterConfig | AdapterDocument) -> bytes:
    """The config blob's bytes: the same for a model and for its document
    (`peftreg.adapters.documents`)."""
    return canonical_json(config if isinstance(config, dict) else config.model_dump(mode="json"))


def adapter_artifact_files(
    imported: ImportedAdapter,
) -> tuple[bytes, list[tuple[Path, str, str]]]:
    """(config blob bytes, [(path, title, media type)]) with the tensors file first."""
    kind = imported.document["kind"]
    media = NOLA_SAFETENSORS_MEDIA_TYPE if kind == "nola" else SAFETENSORS_MEDIA_TYPE
    layers = [(imported.tensors_path, imported.tensors_title, media)]
    layers += [(path, title, FILE_MEDIA_TYPE) for title, path in imported.extra_files]
    return config_blob(imported.document), layers


def adapter_annotations(document: AdapterDocument, title: str) -> dict[str, str]:
    annotations = {TITLE_ANNOTATION: title, KIND_ANNOTATION: document["kind"]}
    if document["rank"] is not None:
        annotations[RANK_ANNOTATION] = str(document["rank"])
    return annotations


def adapter_config_of(manifest: ImageManifest, config_bytes: bytes) -> AdapterConfig:
    if manifest.config.media_type != ADAPTER_CONFIG_MEDIA_TYPE:
        raise InvalidRequest(
            f"not a typed adapter: its config is {manifest.config.media_type!r}, not "
            f"{ADAPTER_CONFIG_MEDIA_TYPE!r}; push the PEFT directory again with this peftreg"
        )
    from peftreg.adapters.schema import AdapterConfig

    return AdapterConfig.model_validate_json(config_bytes)


def export_snapshot_as_peft(
    config: AdapterConfig, snapshot: Path, titles: list[str], output: Path, *, replace: bool
) -> str | None:
    """Write a pulled adapter snapshot as a PEFT directory; a note to print or None."""
    if config.kind == "bottleneck":
        raise InvalidRequest(
            "a bottleneck adapter has no PEFT form (peft has no bottleneck adapter type); "
            "pull it with --format adapterhub"
        )
    tensors_title = NOLA_FILE if config.kind == "nola" else TENSORS_FILE
    if tensors_title not in titles:
        raise InvalidRequest(f"the adapter artifact has no {tensors_title} layer")
    extras = {
        title: snapshot / title
        for title in titles
        if title not in (tensors_title, TENSORS_FILE, "adapter_config.json")
    }
    # Writing tensors needs torch; pushing and pulling files does not.
    from peftreg.adapters.peft_export import write_peft_directory

    return write_peft_directory(
        config, snapshot / tensors_title, output, extra_files=extras, replace=replace
    )
