"""`peftreg ls`, `show`, `history` and `rm`: browsing and deleting versions."""

from __future__ import annotations

import click

from client.cli.common import echo_json, echo_table, human_size, make_client, parse_reference
from client.manifest import TITLE_ANNOTATION
from client.sdk.errors import InvalidRequest


@click.command(name="ls")
@click.argument("namespace", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_repositories(namespace: str | None, as_json: bool) -> None:
    """List repositories (those under NAMESPACE when given)."""
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
    with make_client(offline=False) as client:
        detail = client.version(reference)
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
    with make_client(offline=False) as client:
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
def rm(ref: str, force: bool) -> None:
    """Remove a tag (ns/name:tag) or a version (ns/name@sha256:...).

    A version is refused while tags point at it unless --force. With a tag
    and --force, the whole version the tag names is deleted.
    """
    reference = parse_reference(ref, default_tag=None)
    with make_client(offline=False) as client:
        if reference.digest is None and not force:
            client.delete_manifest(reference)
            click.echo(f"untagged {reference}")
            return
        digest = reference.digest or client.resolve(reference)
        deleted = client.delete_version(reference.repository, digest, force=force)
    removed = f" (tags removed: {', '.join(deleted.tags_removed)})" if deleted.tags_removed else ""
    click.echo(f"deleted {reference.repository}@{deleted.digest}{removed}")
