"""`peftreg base push`: register a base model (its fingerprint) as a base artifact."""

from __future__ import annotations

from pathlib import Path

import click

from peftreg.adapters.base_package import push_base
from peftreg.cli.common import echo_json, human_size, make_client, parse_reference


@click.group()
def base() -> None:
    """Base models adapters are validated against."""


@base.command(name="push")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def push_command(directory: Path, ref: str, as_json: bool) -> None:
    """Push the model in DIRECTORY (config.json, tokenizer, safetensors shards) as REF."""
    reference = parse_reference(ref)
    with make_client(reference, offline=False) as client:
        digest, package = push_base(client, directory, reference)
    if as_json:
        echo_json(
            {
                "reference": str(reference),
                "digest": str(digest),
                "fingerprint": package.config.fingerprint,
                "structure_hash": package.config.structure_hash,
                "tensors": len(package.config.tensors),
                "parameters": package.config.parameters,
                "files": [item.title for item in package.files],
            }
        )
        return
    size = sum(item.size for item in package.files)
    click.echo(f"pushed {reference}@{digest}")
    click.echo(f"fingerprint:    {package.config.fingerprint}")
    click.echo(f"structure hash: {package.config.structure_hash}")
    click.echo(
        f"tensors:        {len(package.config.tensors)} "
        f"({package.config.parameters} parameters, {len(package.files)} files, "
        f"{human_size(size)})"
    )
