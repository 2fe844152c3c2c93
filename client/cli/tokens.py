"""`peftreg token create|ls|revoke` (global administrators)."""

from __future__ import annotations

from datetime import datetime

import click

from peftreg.cli.common import echo_json, echo_table, emit, json_option, make_client
from peftreg.sdk.errors import InvalidRequest


@click.group()
def token() -> None:
    """Create, list and revoke access tokens."""


def _grant(value: str) -> tuple[str, str]:
    pattern, sep, scope = value.rpartition(":")
    if not sep or not pattern or scope not in {"read", "write", "admin"}:
        raise InvalidRequest(f"grant {value!r} is not PATTERN:read|write|admin")
    return pattern, scope


@token.command()
@click.argument("name")
@click.option(
    "--grant",
    "-g",
    "grants",
    multiple=True,
    required=True,
    help="PATTERN:SCOPE, e.g. 'acme/*:write' (repeatable).",
)
@click.option("--expires", type=click.DateTime(), help="Expiry time (ISO 8601).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def create(name: str, grants: tuple[str, ...], expires: datetime | None, as_json: bool) -> None:
    """Create a token; its secret is shown once."""
    with make_client(offline=False) as client:
        issued = client.create_token(name, [_grant(g) for g in grants], expires_at=expires)
    if as_json:
        echo_json(issued)
        return
    click.echo(f"id:     {issued.id}", err=True)
    click.echo(issued.token)


@token.command(name="ls")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_tokens(as_json: bool) -> None:
    """List tokens (never their secrets)."""
    with make_client(offline=False) as client:
        rows = client.list_tokens()
    if as_json:
        echo_json(rows)
        return
    echo_table(
        ("ID", "NAME", "GRANTS", "EXPIRES", "REVOKED"),
        [
            (
                row.id,
                row.name,
                ",".join(f"{g.get('pattern')}:{g.get('scope')}" for g in row.grants),
                row.expires_at.isoformat(timespec="seconds") if row.expires_at else "-",
                row.revoked_at.isoformat(timespec="seconds") if row.revoked_at else "-",
            )
            for row in rows
        ],
    )


@token.command()
@click.argument("token_id")
@json_option
def revoke(token_id: str, as_json: bool) -> None:
    """Revoke a token by id."""
    with make_client(offline=False) as client:
        row = client.revoke_token(token_id)
    emit(as_json, row, f"revoked {row.id} ({row.name})")
