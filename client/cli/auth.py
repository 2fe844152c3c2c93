"""`peftreg login` and `peftreg logout`."""

from __future__ import annotations

import click

from peftreg.cli.config import load_file, resolve, save_file
from peftreg.sdk.client import Client


@click.command()
@click.argument("url", required=False)
@click.option("--token", help="The token; prompted for (hidden) when not given.")
def login(url: str | None, token: str | None) -> None:
    """Check a token against a registry and store both in the config file (mode 0600)."""
    url = (url or resolve().url).rstrip("/")
    if token is None:
        token = click.prompt("Token", hide_input=True, default="", show_default=False)
    with Client(url, token or None, retries=1) as client:
        client.ping()
    data = load_file()
    data["url"] = url
    if token:
        data["token"] = token
    else:
        data.pop("token", None)
    path = save_file(data)
    click.echo(f"Logged in to {url} (saved to {path})")


@click.command()
def logout() -> None:
    """Forget the stored token."""
    data = load_file()
    had = data.pop("token", None) is not None
    save_file(data)
    click.echo("Logged out" if had else "Not logged in")
