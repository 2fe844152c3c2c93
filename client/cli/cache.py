"""`peftreg cache ls|verify|prune`: the local cache of pulled artifacts."""

from __future__ import annotations

import click

from peftreg.cache import Cache
from peftreg.cli.common import EXIT_ERROR, echo_json, echo_table, fail, human_size


@click.group()
def cache() -> None:
    """Inspect, verify and prune the local cache (PEFTREG_CACHE)."""


@cache.command(name="ls")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
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
def verify(delete: bool) -> None:
    """Re-hash every cached blob and manifest; exit 1 naming any corrupted."""
    store = Cache()
    problems = store.verify()
    for problem in problems:
        click.echo(f"corrupted: {problem.path}: {problem.problem}")
        if delete:
            problem.path.unlink(missing_ok=True)
    if problems:
        store.remove_snapshots()
        raise fail(f"{len(problems)} corrupted item(s) in {store.root}", EXIT_ERROR)
    click.echo("cache OK")


@cache.command()
@click.option("--all", "everything", is_flag=True, help="Empty the cache entirely.")
def prune(everything: bool) -> None:
    """Remove partial downloads and what no cached reference reaches."""
    store = Cache()
    if everything:
        size = store.size()
        store.clear()
        click.echo(f"removed everything ({human_size(size)})")
        return
    click.echo(f"freed {human_size(store.prune())}")
