"""`peftreg push`, `peftreg pull` and `peftreg tag`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from peftreg.adapters.quantization_names import BASE_QUANTIZATIONS
from peftreg.cli.common import (
    emit,
    json_option,
    make_client,
    make_progress,
    parse_reference,
)
from peftreg.digest import Digest
from peftreg.media_types import BASE_ARTIFACT, TITLE_ANNOTATION
from peftreg.reference import Reference
from peftreg.sdk.errors import InvalidRequest

if TYPE_CHECKING:
    from peftreg.sdk.client import Client
    from peftreg.transfer.pull import PullResult


def _annotations(values: tuple[str, ...]) -> dict[str, str]:
    result: dict[str, str] = {}
    for value in values:
        key, sep, text = value.partition("=")
        if not sep or not key:
            raise InvalidRequest(f"annotation {value!r} is not KEY=VALUE")
        result[key] = text
    return result


@click.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.argument("ref")
@click.option("--artifact-type", help="The manifest's artifactType (guessed by default).")
@click.option("--annotation", "-a", multiple=True, help="KEY=VALUE manifest annotation.")
@click.option("--mount-from", help="Mount blobs the server has in this repository.")
@click.option(
    "--base",
    "base_ref",
    help="The adapter's base model: a base REF pushed with `peftreg base push`, or its "
    "sha256 fingerprint. The registry checks the adapter against it.",
)
@click.option(
    "--base-quantization",
    type=click.Choice(list(BASE_QUANTIZATIONS)),
    help="Quantization of the base the adapter was trained against (nf4 for QLoRA).",
)
@click.option(
    "--kind",
    type=click.Choice(["hard-prompt"]),
    help="hard-prompt: PATH is a text prompt template (UTF-8, {name} placeholders), bound "
    "to the tokenizer of --base or --tokenizer.",
)
@click.option(
    "--tokenizer",
    "tokenizer_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="--kind hard-prompt: a local directory with the tokenizer's files (tokenizer.json).",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@json_option
def push(
    path: Path,
    ref: str,
    artifact_type: str | None,
    annotation: tuple[str, ...],
    mount_from: str | None,
    base_ref: str | None,
    base_quantization: str | None,
    kind: str | None,
    tokenizer_dir: Path | None,
    quiet: bool,
    as_json: bool,
) -> None:
    """Push a file or a directory (a layer per file) as REF ([host/]ns/name:tag).

    A PEFT adapter directory is pushed as a typed adapter; with --kind hard-prompt, a
    text file is pushed as a hard prompt.
    """
    reference = parse_reference(ref)
    if kind == "hard-prompt":
        if artifact_type or mount_from or base_quantization:
            raise InvalidRequest(
                "--kind hard-prompt takes --base, --tokenizer and --annotation only"
            )
        _push_prompt(path, reference, base_ref, tokenizer_dir, _annotations(annotation), as_json)
        return
    if tokenizer_dir is not None:
        raise InvalidRequest("--tokenizer goes with --kind hard-prompt")
    with make_client(reference, offline=False) as client:
        base = client.base_reference(base_ref) if base_ref else None
        if base_quantization is not None:
            from peftreg.adapters.schema import BaseReference

            base = (base or BaseReference()).model_copy(update={"quantization": base_quantization})
        result = client.push(
            path,
            reference,
            artifact_type=artifact_type,
            annotations=_annotations(annotation),
            mount_from=mount_from,
            base=base,
            base_ref=base_ref if base_ref and not base_ref.startswith("sha256:") else None,
            progress=make_progress(quiet),
        )
    if not quiet and not as_json:
        click.echo(
            f"{result.uploaded_blobs} uploaded, {result.skipped_blobs} already present",
            err=True,
        )
    payload = {
        "reference": str(reference),
        "registry": client.url,
        "digest": str(result.digest),
        "uploaded_blobs": result.uploaded_blobs,
        "skipped_blobs": result.skipped_blobs,
    }
    emit(as_json, payload, f"{reference} {result.digest}")


def _push_prompt(
    path: Path,
    reference: Reference,
    base_ref: str | None,
    tokenizer_dir: Path | None,
    annotations: dict[str, str],
    as_json: bool,
) -> None:
    from peftreg.prompts.package import push_prompt

    with make_client(reference, offline=False) as client:
        digest, config = push_prompt(
            client,
            path,
            reference,
            base_ref=base_ref,
            tokenizer_dir=tokenizer_dir,
            annotations=annotations,
        )
    tokens = config.tokenizer.token_count if config.tokenizer is not None else None
    payload = {
        "reference": str(reference),
        "registry": client.url,
        "digest": str(digest),
        "kind": config.kind,
        "placeholders": config.placeholders,
        "token_count": tokens,
    }
    counted = f" ({tokens} tokens)" if tokens is not None else ""
    emit(as_json, payload, f"{reference} {digest}{counted}")


# The formats written as a whole directory (or file) at --output.
DIRECTORY_FORMATS = ("peft", "adapterhub", "gguf-lora")


@click.command()
@click.argument("ref")
@click.option(
    "--output",
    "-o",
    type=click.Path(path_type=Path),
    help="Directory to write (--format gguf-lora: the .gguf file); without it, the path of "
    "the cache snapshot is printed.",
)
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists and is not empty.")
@click.option("--offline", is_flag=True, help="Use the cache only (as PEFTREG_OFFLINE=1).")
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["files", "peft", "adapterhub", "gguf-lora"]),
    default="files",
    show_default=True,
    help="files: the layers as pushed; peft: a PEFT adapter directory (needs --output); "
    "adapterhub: an AdapterHub adapter directory for model.load_adapter(DIR, "
    "use_safetensors=True) (needs --output; bottleneck adapters and LoRAs imported from "
    "AdapterHub); gguf-lora: a GGUF LoRA file for llama.cpp's --lora (needs --output and "
    "--base).",
)
@click.option(
    "--base",
    "base",
    help="gguf-lora: the adapter's base, a registered base REF or a local model directory "
    "(its config.json gives the architecture).",
)
@click.option(
    "--include",
    multiple=True,
    metavar="GLOB",
    help="Pull only files whose name matches (repeatable), e.g. '*.safetensors'.",
)
@click.option(
    "--exclude", multiple=True, metavar="GLOB", help="Skip files that match (repeatable)."
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@json_option
def pull(
    ref: str,
    output: Path | None,
    force: bool,
    offline: bool,
    output_format: str,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    base: str | None,
    quiet: bool,
    as_json: bool,
) -> None:
    """Pull REF ([host/]ns/name:tag or ns/name@sha256:...) through the cache.

    With the registry unreachable, a reference already in the cache is served
    from it, with a warning.
    """
    reference = parse_reference(ref)
    if output_format in DIRECTORY_FORMATS and output is None:
        raise InvalidRequest(f"--format {output_format} needs --output DIR")
    if output_format in DIRECTORY_FORMATS and (include or exclude):
        raise InvalidRequest(
            f"--format {output_format} writes the whole adapter: drop --include/--exclude"
        )
    if (output_format == "gguf-lora") != (base is not None):
        raise InvalidRequest("--base goes with --format gguf-lora, and it needs one")
    with make_client(reference, offline=True if offline else None) as client:
        progress = make_progress(quiet or as_json)
        if output_format == "gguf-lora":
            assert output is not None
            assert base is not None
            result = client.pull(reference, None, progress=progress)
            _warn_fallback(result)
            model_config = _base_model_config(client, base)
            _export_gguf_lora(result, model_config, output, force)
            emit(
                as_json,
                {
                    "reference": str(reference),
                    "digest": str(result.digest),
                    "path": str(output),
                    "format": "gguf-lora",
                },
                str(output),
            )
            return
        if output_format in ("peft", "adapterhub"):
            result = client.pull(reference, None, progress=progress)
            assert output is not None
            _warn_fallback(result)
            if output_format == "peft":
                _export_peft(result, output, force)
            else:
                _export_adapterhub(result, output, force)
            path = output
        else:
            result = client.pull(
                reference,
                output,
                replace=force,
                progress=progress,
                include=include,
                exclude=exclude,
            )
            _warn_fallback(result)
            path = result.path
    payload = {
        "reference": str(reference),
        "digest": str(result.digest),
        "path": str(path),
        "files": [
            {"title": str(title), "digest": str(digest), "size": size}
            for title, digest, size in result.files
        ],
        "unpacked": sorted(str(title) for title in result.unpacked),
        "downloaded_bytes": result.downloaded,
        "from_cache_offline": result.offline_fallback is not None,
    }
    emit(as_json, payload, str(path))


def _warn_fallback(result: PullResult) -> None:
    if result.offline_fallback is not None:
        click.echo(
            f"peftreg: warning: registry unreachable ({result.offline_fallback}); "
            f"serving {result.reference} {result.digest} from the cache",
            err=True,
        )


def _export_peft(result: PullResult, output: Path, force: bool) -> None:
    from peftreg.adapters.package import export_snapshot_as_peft
    from peftreg.adapters.schema import AdapterConfig

    if result.adapter_config is None:
        raise InvalidRequest(
            f"{result.reference} is not a typed adapter artifact; pull it without --format peft"
        )
    config = AdapterConfig.model_validate_json(result.adapter_config)
    titles = [str(title) for title, _digest, _size in result.files]
    note = export_snapshot_as_peft(config, result.path, titles, output, replace=force)
    if note:
        click.echo(note, err=True)


def _export_adapterhub(result: PullResult, output: Path, force: bool) -> None:
    from peftreg.adapters.adapterhub import export_snapshot_as_adapterhub
    from peftreg.adapters.schema import AdapterConfig

    if result.adapter_config is None:
        raise InvalidRequest(
            f"{result.reference} is not a typed adapter artifact; pull it without --format "
            "adapterhub"
        )
    config = AdapterConfig.model_validate_json(result.adapter_config)
    titles = [str(title) for title, _digest, _size in result.files]
    export_snapshot_as_adapterhub(config, result.path, titles, output, replace=force)


def _base_model_config(client: Client, base: str) -> dict[str, Any]:
    """The config.json of a local base directory, or of a registered base artifact."""
    directory = Path(base)
    if directory.is_dir():
        path = directory / "config.json"
        if not path.is_file():
            raise InvalidRequest(f"{base} has no config.json")
        document = json.loads(path.read_text(encoding="utf-8"))
    else:
        reference = parse_reference(base)
        manifest = json.loads(client.get_manifest(reference).content)
        layers = [
            layer
            for layer in manifest.get("layers", [])
            if layer.get("annotations", {}).get(TITLE_ANNOTATION) == "config.json"
        ]
        if manifest.get("artifactType") != BASE_ARTIFACT or not layers:
            raise InvalidRequest(f"{base} is not a base artifact with a config.json")
        document = json.loads(client.get_blob(reference.repository, layers[0]["digest"]))
    if not isinstance(document, dict):
        raise InvalidRequest(f"the config.json of {base} is not a JSON object")
    return document


def _export_gguf_lora(
    result: PullResult, model_config: dict[str, Any], output: Path, force: bool
) -> None:
    from peftreg.adapters.schema import AdapterConfig
    from peftreg.gguf.lora import write_gguf_lora
    from peftreg.merge.inputs import adapter_from_snapshot

    if result.adapter_config is None:
        raise InvalidRequest(
            f"{result.reference} is not a typed adapter artifact; only adapters convert to "
            "a GGUF LoRA"
        )
    config = AdapterConfig.model_validate_json(result.adapter_config)
    adapter = adapter_from_snapshot(
        result.path, config, digest=str(result.digest), label=str(result.reference)
    )
    write_gguf_lora(adapter, model_config, output, replace=force, name=str(result.reference))


@click.command()
@click.argument("src_ref")
@click.argument("dst_ref")
@json_option
def tag(src_ref: str, dst_ref: str, as_json: bool) -> None:
    """Point DST_REF at the version SRC_REF names (mounting blobs across repositories)."""
    source = parse_reference(src_ref)
    target = parse_reference(dst_ref)
    if target.digest is not None:
        raise InvalidRequest(f"{dst_ref} must name a tag")
    with make_client(source, target, offline=False) as client:
        manifest = client.get_manifest(source)
        if target.repository != source.repository:
            from peftreg.manifest import parse_manifest

            parsed = parse_manifest(manifest.content, manifest.media_type)
            blobs = [getattr(parsed, "config", None), *getattr(parsed, "layers", [])]
            for blob in blobs:
                if blob is not None and not client.mount_blob(
                    target.repository, Digest.parse(blob.digest), source.repository
                ):
                    raise InvalidRequest(
                        f"cannot mount {blob.digest} from {source.repository} "
                        f"into {target.repository}"
                    )
        digest = client.put_manifest(target, manifest.content, manifest.media_type)
    emit(
        as_json,
        {"source": str(source), "reference": str(target), "digest": str(digest)},
        f"{target} {digest}",
    )
