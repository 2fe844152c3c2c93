"""`peftreg login` and `peftreg logout`."""

from __future__ import annotations

import sys

import click

from peftreg.cli.common import emit, json_option
from peftreg.cli.config import host_of, load_file, remember, resolve, save_file, url_for
from peftreg.sdk.client import Client
from peftreg.sdk.errors import InvalidRequest


def _read_token(token: str | None, token_stdin: bool) -> str:
    if token is not None and token_stdin:
        raise InvalidRequest("give the token with --token or --token-stdin, not both")
    if token_stdin:
        return sys.stdin.read().strip()
    if token is not None:
        return token
    if not sys.stdin.isatty():
        # No terminal to prompt on (a pipe, CI): read a line rather than warn from getpass.
        return sys.stdin.readline().strip()
    return str(click.prompt("Token", hide_input=True, default="", show_default=False))


@click.command()
@click.argument("registry", required=False)
@click.option("--token", help="The token (visible in the process list: prefer --token-stdin).")
@click.option("--token-stdin", is_flag=True, help="Read the token from standard input.")
@json_option
def login(registry: str | None, token: str | None, token_stdin: bool, as_json: bool) -> None:
    """Check a token against REGISTRY (a URL or host[:port]) and store both (mode 0600).

    The token is stored for that host: references naming the host
    (`host:port/ns/name:tag`) use it; the registry also becomes the default.
    """
    url = url_for(registry) if registry else resolve().url
    secret = _read_token(token, token_stdin)
    with Client(url, secret or None, retries=1) as client:
        client.ping()
    path = save_file(remember(load_file(), url, secret or None))
    emit(
        as_json,
        {"registry": host_of(url), "url": url, "token_stored": bool(secret), "config": str(path)},
        f"Logged in to {url} (saved to {path})",
    )


@click.command()
@click.argument("registry", required=False)
@json_option
def logout(registry: str | None, as_json: bool) -> None:
    """Forget the token stored for REGISTRY (default: the default registry)."""
    from peftreg.cli.config import forget

    host = host_of(url_for(registry)) if registry else host_of(resolve().url)
    data = load_file()
    had = forget(data, host)
    save_file(data)
    emit(as_json, {"registry": host, "logged_out": had}, "Logged out" if had else "Not logged in")
