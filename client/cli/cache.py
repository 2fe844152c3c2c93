"""`peftreg cache ls|verify|prune|rm`: the local cache of pulled artifacts."""

from __future__ import annotations

import click

from peftreg.cache import Cache
from peftreg.cli.common import (
    EXIT_ERROR,
    echo_json,
    echo_table,
    emit,
    fail,
    human_size,
    json_option,
    parse_reference,
)


@click.group()
def cache() -> None:
    """Inspect, verify and prune the local cache (PEFTREG_CACHE)."""


@cache.command(name="ls")
@json_option
def list_cache(as_json: bool) -> None:
    """List cached references and the cache's size."""
    store = Cache()
    rows = []
    for ref in store.iter_refs():
        complete = store.get_manifest(ref.digest) is not None
        rows.append(
            {
                "repository": ref.repository,
                "tag": ref.tag,
                "digest": str(ref.digest),
                "manifest_cached": complete,
                "snapshot": str(store.snapshot_path(ref.digest)),
            }
        )
    size = store.size()
    if as_json:
        echo_json({"root": str(store.root), "size": size, "refs": rows})
        return
    echo_table(
        ("REFERENCE", "DIGEST"),
        [(f"{row['repository']}:{row['tag']}", row["digest"]) for row in rows],
    )
    click.echo(f"{store.root}: {human_size(size)} of blobs", err=True)


@cache.command()
@click.option("--delete", is_flag=True, help="Delete what is corrupted.")
@json_option
def verify(delete: bool, as_json: bool) -> None:
    """Re-hash every cached blob and manifest; exit 1 naming any corrupted."""
    store = Cache()
    problems = store.verify()
    for problem in problems:
        if not as_json:
            click.echo(f"corrupted: {problem.path}: {problem.problem}")
        if delete:
            problem.path.unlink(missing_ok=True)
    if as_json:
        echo_json(
            {
                "root": str(store.root),
                "ok": not problems,
                "deleted": delete and bool(problems),
                "problems": [{"path": str(p.path), "problem": p.problem} for p in problems],
            }
        )
    if problems:
        store.remove_snapshots()
        raise fail(f"{len(problems)} corrupted item(s) in {store.root}", EXIT_ERROR)
    if not as_json:
        click.echo("cache OK")


@cache.command()
@click.option("--all", "everything", is_flag=True, help="Empty the cache entirely.")
@json_option
def prune(everything: bool, as_json: bool) -> None:
    """Remove partial downloads and what no cached reference reaches."""
    store = Cache()
    if everything:
        size = store.size()
        store.clear()
        emit(
            as_json, {"all": True, "freed_bytes": size}, f"removed everything ({human_size(size)})"
        )
        return
    freed = store.prune()
    emit(as_json, {"all": False, "freed_bytes": freed}, f"freed {human_size(freed)}")


@cache.command(name="rm")
@click.argument("ref")
@json_option
def remove(ref: str, as_json: bool) -> None:
    """Forget REF (ns/name:tag, or ns/name@sha256:... with all its tags) and what only it used."""
    from peftreg.cache_eviction import evict

    reference = parse_reference(ref, default_tag=None)
    result = evict(Cache(), reference)
    emit(
        as_json,
        {
            "reference": str(reference),
            "refs": result.refs,
            "manifests": result.manifests,
            "blobs": result.blobs,
            "freed_bytes": result.freed_bytes,
        },
        f"removed {reference} ({result.blobs} blobs, {human_size(result.freed_bytes)} freed)",
    )
