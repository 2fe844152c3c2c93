"""`peftreg fingerprint DIR`: a base model's fingerprint, computed locally."""

from __future__ import annotations

import json
from pathlib import Path

import click

from peftreg.formats.fingerprint import fingerprint_directory
from peftreg.formats.safetensors_header import SafetensorsError


@click.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def fingerprint(directory: Path, as_json: bool) -> None:
    """Print the content fingerprint and structure hash of a model directory.

    Streams each safetensors shard (memory near one read buffer) and needs
    no server. The result does not depend on how tensors are sharded.
    """
    try:
        result = fingerprint_directory(directory)
    except SafetensorsError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
        return
    click.echo(f"fingerprint     {result.fingerprint}")
    click.echo(f"structure hash  {result.structure_hash}")
    click.echo(f"tensors         {result.tensors}")
    click.echo(f"parameters      {result.parameters}")
