"""`peftreg ls`, `show`, `diff`, `history` and `rm`: browsing and deleting versions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from peftreg.adapters.compare import AdapterSide, compare_adapters, file_side
from peftreg.adapters.schema import NOLA_SAFETENSORS_MEDIA_TYPE, SAFETENSORS_MEDIA_TYPE
from peftreg.cli.common import (
    echo_json,
    echo_table,
    emit,
    human_size,
    json_option,
    make_client,
    parse_reference,
)
from peftreg.manifest import PROMPT_ARTIFACT, TITLE_ANNOTATION
from peftreg.sdk.client import Client
from peftreg.sdk.errors import InvalidRequest
from peftreg.sdk.models import Version


def resolve_base(client: Client, text: str) -> str:
    """A base fingerprint: given as `sha256:...`, or read from the base artifact REF names."""
    fingerprint = client.base_reference(text).fingerprint
    assert fingerprint is not None
    return fingerprint


def _short(digest: str | None) -> str:
    return "-" if not digest else digest.split(":", 1)[-1][:12]


def _list_versions(
    namespace: str | None,
    base_ref: str | None,
    kind: str | None,
    max_rank: int | None,
    quantization: str | None,
    verified: bool | None,
    as_json: bool,
) -> None:
    prefix = namespace.strip("/") if namespace else None
    with make_client(offline=False) as client:
        base = resolve_base(client, base_ref) if base_ref else None
        found = client.versions(
            None,
            kind=kind,
            base=base,
            max_rank=max_rank,
            base_quantization=quantization,
            verified=verified,
        )
    versions: list[Version] = [
        v
        for v in found
        if prefix is None or v.repository == prefix or v.repository.startswith(prefix + "/")
    ]
    if as_json:
        echo_json(versions)
        return
    rows = []
    for v in versions:
        summary = v.adapter
        rows.append(
            (
                f"{v.repository}@{_short(v.digest)}",
                ",".join(v.tags) or "-",
                summary.kind if summary else "-",
                summary.rank if summary and summary.rank is not None else "-",
                _short(summary.base_fingerprint) if summary else "-",
                ("yes" if summary.verified else "no") if summary else "-",
            )
        )
    echo_table(("VERSION", "TAGS", "KIND", "RANK", "BASE", "VERIFIED"), rows)


@click.command(name="ls")
@click.argument("namespace", required=False)
@click.option("--base", "base_ref", help="Adapters of this base (REF or sha256 fingerprint).")
@click.option("--kind", help="Adapters of this kind (lora, dora, prompt_tuning, ...).")
@click.option("--max-rank", type=int, help="Adapters whose largest rank is at most this.")
@click.option("--quantization", help="Adapters trained against this base quantization.")
@click.option("--verified/--unverified", default=None, help="Checked against a registered base.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_repositories(
    namespace: str | None,
    base_ref: str | None,
    kind: str | None,
    max_rank: int | None,
    quantization: str | None,
    verified: bool | None,
    as_json: bool,
) -> None:
    """List repositories (those under NAMESPACE when given).

    With --base, --kind, --max-rank, --quantization or --verified, list the
    adapter versions that match instead.
    """
    if any(v is not None for v in (base_ref, kind, max_rank, quantization, verified)):
        _list_versions(namespace, base_ref, kind, max_rank, quantization, verified, as_json)
        return
    prefix = namespace.strip("/") if namespace else None
    with make_client(offline=False) as client:
        repositories = [
            repo
            for repo in client.repositories(prefix)
            if prefix is None or repo.name == prefix or repo.name.startswith(prefix + "/")
        ]
    if as_json:
        echo_json(repositories)
        return
    echo_table(
        ("REPOSITORY", "VERSIONS", "TAGS", "IMMUTABLE"),
        [(r.name, r.versions, r.tags, ",".join(r.immutable_tags)) for r in repositories],
    )


@click.command()
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show(ref: str, as_json: bool) -> None:
    """Show one version: digest, tags, files, annotations."""
    reference = parse_reference(ref)
    with make_client(reference, offline=False) as client:
        detail = client.version(reference)
        config = detail.config
        if detail.adapter is not None and not isinstance(config, dict):
            config_digest = str((detail.manifest.get("config") or {}).get("digest", ""))
            config = json.loads(client.get_blob(reference.repository, config_digest))
    if as_json:
        echo_json(detail)
        return
    click.echo(f"repository:    {detail.repository}")
    click.echo(f"digest:        {detail.digest}")
    click.echo(f"artifact type: {detail.artifact_type or '-'}")
    click.echo(f"tags:          {', '.join(detail.tags) or '-'}")
    click.echo(f"pushed by:     {detail.pushed_by or '-'} at {detail.created_at.isoformat()}")
    for key, value in sorted(detail.annotations.items()):
        click.echo(f"annotation:    {key}={value}")
    if detail.adapter is not None and isinstance(config, dict):
        _echo_artifact(detail.adapter.model_dump(), config)
    layers = detail.manifest.get("layers") or []
    if layers:
        click.echo("files:")
        echo_table(
            ("  TITLE", "SIZE", "DIGEST"),
            [
                (
                    "  " + str((layer.get("annotations") or {}).get(TITLE_ANNOTATION, "-")),
                    human_size(int(layer.get("size", 0))),
                    layer.get("digest", ""),
                )
                for layer in layers
            ],
        )


@click.command()
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def history(ref: str, as_json: bool) -> None:
    """Every move of the tag REF names (ns/name:tag), oldest first."""
    reference = parse_reference(ref, default_tag=None)
    if reference.tag is None:
        raise InvalidRequest("history needs a tag reference (ns/name:tag)")
    with make_client(reference, offline=False) as client:
        events = client.tag_history(reference.repository, reference.tag)
    if as_json:
        echo_json(events)
        return
    echo_table(
        ("AT", "ACTOR", "FROM", "TO"),
        [
            (e.at.isoformat(timespec="seconds"), e.actor, e.from_digest or "-", e.to_digest or "-")
            for e in events
        ],
    )


@click.command()
@click.argument("ref")
@click.option(
    "--force",
    is_flag=True,
    help="Delete the version itself, and every tag pointing at it.",
)
@json_option
def rm(ref: str, force: bool, as_json: bool) -> None:
    """Remove a tag (ns/name:tag) or a version (ns/name@sha256:...).

    A version is refused while tags point at it unless --force. With a tag
    and --force, the whole version the tag names is deleted.
    """
    reference = parse_reference(ref, default_tag=None)
    with make_client(reference, offline=False) as client:
        if reference.digest is None and not force:
            client.delete_manifest(reference)
            emit(
                as_json,
                {"reference": str(reference), "untagged": reference.tag, "deleted": None},
                f"untagged {reference}",
            )
            return
        digest = reference.digest or client.resolve(reference)
        deleted = client.delete_version(reference.repository, digest, force=force)
    removed = f" (tags removed: {', '.join(deleted.tags_removed)})" if deleted.tags_removed else ""
    emit(
        as_json,
        {
            "reference": str(reference),
            "untagged": None,
            "deleted": str(deleted.digest),
            "tags_removed": list(deleted.tags_removed),
        },
        f"deleted {reference.repository}@{deleted.digest}{removed}",
    )


def _kind_text(kind: str | None, config: dict[str, Any]) -> str:
    """The kind with the features that change its meaning: `lora (aLoRA, rsLoRA)`."""
    from peftreg.adapters.features import variants

    peft_config = config.get("peft_config")
    found = variants(peft_config) if isinstance(peft_config, dict) else []
    return f"{kind} ({', '.join(found)})" if found else str(kind)


def _echo_prompt(summary: dict[str, Any], config: dict[str, Any]) -> None:
    base = config.get("base") or {}
    tokenizer = config.get("tokenizer") or {}
    click.echo("kind:          hard_prompt")
    if base:
        verified = "verified" if summary["verified"] else "unverified: base not registered"
        click.echo(f"base:          {base.get('name') or '-'}")
        click.echo(f"base fingerprint: {base.get('fingerprint') or '-'} ({verified})")
    if tokenizer:
        click.echo(f"tokenizer:     {tokenizer.get('identity')}")
        click.echo(f"tokens:        {tokenizer.get('token_count')}")
    else:
        click.echo("tokenizer:     - (not bound: pushed without --base or --tokenizer)")
    click.echo(f"placeholders:  {', '.join(config.get('placeholders') or []) or '-'}")
    click.echo(f"bytes:         {config.get('bytes')}")
    click.echo("template:")
    for line in str(config.get("template", "")).splitlines():
        click.echo(f"  {line}")


def _echo_artifact(summary: dict[str, Any], config: dict[str, Any]) -> None:
    if summary["kind"] == "hard_prompt":
        _echo_prompt(summary, config)
        return
    if summary["kind"] == "base":
        click.echo("kind:          base")
        click.echo(f"fingerprint:   {config.get('fingerprint')}")
        click.echo(f"architecture:  {config.get('architecture') or '-'}")
        click.echo(f"parameters:    {config.get('parameters')}")
        return
    base = config.get("base") or {}
    verified = "verified" if summary["verified"] else "unverified: base not registered"
    click.echo(f"kind:          {_kind_text(summary['kind'], config)}")
    click.echo(f"base:          {base.get('name') or '-'}")
    click.echo(f"base fingerprint: {base.get('fingerprint') or '-'} ({verified})")
    if base.get("quantization", "none") != "none":
        click.echo(f"base quantization: {base.get('quantization')}")
    click.echo(f"rank:          {summary['rank'] if summary['rank'] is not None else '-'}")
    size = human_size(int(config.get("bytes", 0)))
    click.echo(f"parameters:    {config.get('parameters')} ({size})")
    nola = config.get("nola")
    if isinstance(nola, dict) and nola.get("stored_parameters"):
        ratio = nola["materialized_parameters"] / nola["stored_parameters"]
        click.echo(
            f"nola:          {nola['stored_parameters']} stored parameters for "
            f"{nola['materialized_parameters']} materialized ({ratio:.1f}x smaller than LoRA)"
        )
    mora = config.get("mora")
    if isinstance(mora, dict):
        click.echo(
            f"mora:          type {mora.get('mora_type')}, r={mora.get('r')}: square "
            f"matrices up to {mora.get('r_hat')}x{mora.get('r_hat')} (r below is each side)"
        )
    bottleneck = config.get("bottleneck")
    if isinstance(bottleneck, dict):
        sites = [s for s in ("mh_adapter", "output_adapter") if bottleneck.get(s)]
        factor = bottleneck.get("reduction_factor")
        factor_text = f"{factor:g}" if isinstance(factor, int | float) else str(factor)
        click.echo(
            f"bottleneck:    {bottleneck.get('style')} (AdapterHub), reduction factor "
            f"{factor_text}, {bottleneck.get('non_linearity')}, "
            f"{'+'.join(sites)}, layers {bottleneck.get('layers')}"
        )
    targets = config.get("targets") or []
    modules = config.get("modules") or []
    click.echo(f"targets:       {len(targets) + len(modules)}")
    for target in targets:
        click.echo(
            f"  {target['module']}  {target.get('layer', 'linear')}  r={target['rank']}  "
            f"alpha={target['alpha']:g}"
        )
    for module in modules:  # a generic peft type: its rank, or what stands for it
        rank = module.get("rank")
        click.echo(f"  {module['module']}" + ("" if rank is None else f"  r={rank}"))


def _prompt_config(client: Client, text: str) -> dict[str, Any] | None:
    """The config of the hard prompt REF names; None for another artifact."""
    from peftreg.prompts.package import load_prompt

    reference = parse_reference(text)
    manifest = json.loads(client.get_manifest(reference).content)
    if manifest.get("artifactType") != PROMPT_ARTIFACT:
        return None
    return load_prompt(client, reference).config.model_dump(mode="json")


def _diff_prompts(
    client: Client,
    refs: tuple[str, str],
    configs: tuple[dict[str, Any] | None, dict[str, Any] | None],
    as_json: bool,
) -> None:
    """Two hard prompts: kind, tokenizer, token counts, placeholders and a text diff."""
    import difflib

    sides: list[dict[str, Any]] = []
    for ref, config in zip(refs, configs, strict=True):
        if config is None:
            raw = _load_adapter(client, ref).config
            sides.append({"kind": raw.get("kind"), "template": None, "tokenizer": None})
        else:
            sides.append(config)
    a, b = sides
    texts = [str(side.get("template") or "").splitlines(keepends=True) for side in sides]
    lines = list(difflib.unified_diff(texts[0], texts[1], refs[0], refs[1]))

    def tokens(side: dict[str, Any]) -> Any:
        return (side.get("tokenizer") or {}).get("token_count")

    def identity(side: dict[str, Any]) -> Any:
        return (side.get("tokenizer") or {}).get("identity")

    text_diff = "".join(lines)
    report: dict[str, Any] = {
        "kind": [a.get("kind"), b.get("kind")],
        "tokenizer": [identity(a), identity(b)],
        "tokens": [tokens(a), tokens(b)],
        "placeholders": [a.get("placeholders"), b.get("placeholders")],
        "text_diff": text_diff,
    }
    if as_json:
        echo_json(report)
        return
    for key in ("kind", "tokenizer", "tokens", "placeholders"):
        first, second = report[key]
        click.echo(f"{key + ':':13} {first}" + ("" if first == second else f" -> {second}"))
    click.echo(text_diff.rstrip("\n") if lines else "text:         identical")


def _load_adapter(client: Client, text: str) -> AdapterSide:
    """The adapter REF names: its config, and its weights from the cache."""
    reference = parse_reference(text)
    manifest = json.loads(client.get_manifest(reference).content)
    config = json.loads(client.get_blob(reference.repository, manifest["config"]["digest"]))
    layers = manifest.get("layers") or []
    weights = [
        layer
        for layer in layers
        if layer.get("mediaType") in (SAFETENSORS_MEDIA_TYPE, NOLA_SAFETENSORS_MEDIA_TYPE)
        or str((layer.get("annotations") or {}).get(TITLE_ANNOTATION, "")).endswith(".safetensors")
    ]
    if len(weights) != 1 or not isinstance(config, dict) or "kind" not in config:
        raise InvalidRequest(f"{text} is not an adapter artifact")
    path = client.download_blob(reference.repository, weights[0]["digest"], int(weights[0]["size"]))
    return file_side(config, Path(path))


@click.command()
@click.argument("ref1")
@click.argument("ref2")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def diff(ref1: str, ref2: str, as_json: bool) -> None:
    """Compare two adapters: kind, rank, targets, and how far each common tensor moved."""
    references = (parse_reference(ref1), parse_reference(ref2))
    with make_client(*references, offline=False) as client:
        prompts = (_prompt_config(client, ref1), _prompt_config(client, ref2))
        if prompts[0] is not None or prompts[1] is not None:
            _diff_prompts(client, (ref1, ref2), prompts, as_json)
            return
        side_a = _load_adapter(client, ref1)
        side_b = _load_adapter(client, ref2)
    report = compare_adapters(side_a, side_b).as_json()
    changes = report["relative_change"]
    if as_json:
        echo_json(report)
        return
    kind_a = _kind_text(side_a.config.get("kind"), dict(side_a.config))
    kind_b = _kind_text(side_b.config.get("kind"), dict(side_b.config))
    rank_a, rank_b = report["rank"]
    click.echo(f"kind:    {kind_a}" + ("" if kind_a == kind_b else f" -> {kind_b}"))
    click.echo(f"rank:    {rank_a}" + ("" if rank_a == rank_b else f" -> {rank_b}"))
    for module in report["targets_added"]:
        click.echo(f"+ target {module}")
    for module in report["targets_removed"]:
        click.echo(f"- target {module}")
    for name in report["tensors_added"]:
        click.echo(f"+ tensor {name}")
    for name in report["tensors_removed"]:
        click.echo(f"- tensor {name}")
    echo_table(
        ("TENSOR", "||a-b||/||a||"),
        [
            (name, "shape/dtype differs" if value is None else f"{value:.6g}")
            for name, value in changes.items()
        ],
    )
