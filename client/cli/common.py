"""What every CLI command shares: the client, progress bars, output and errors."""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from peftreg.cache import Cache
from peftreg.cli.config import resolve
from peftreg.cli.group import EXIT_ERROR, EXIT_USAGE, PeftregGroup, fail
from peftreg.reference import InvalidReference, Reference
from peftreg.sdk.client import Client
from peftreg.sdk.errors import InvalidReferenceError, InvalidRequest
from peftreg.transfer.progress import NullProgress, Progress

ENV_RETRIES = "PEFTREG_RETRIES"


def registry_of(*references: Reference) -> str | None:
    """The registry host the references name (None: the default registry)."""
    hosts = {reference.registry for reference in references if reference.registry}
    if len(hosts) > 1:
        raise InvalidRequest(
            f"the references name different registries: {', '.join(sorted(hosts))}"
        )
    return hosts.pop() if hosts else None


def make_client(*references: Reference, offline: bool | None = None) -> Client:
    """A client for the registry the references name (their host), else the default one."""
    settings = resolve(registry_of(*references))
    retries = int(os.environ.get(ENV_RETRIES, "4"))
    return Client(settings.url, settings.token, retries=retries, cache=Cache(), offline=offline)


F = TypeVar("F", bound=Callable[..., Any])


def json_option(command: F) -> F:
    """`--json`: machine-readable output on stdout (every command has it)."""
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(command)


def emit(as_json: bool, payload: Any, text: str | None) -> None:
    """Print `payload` as JSON with --json, else `text` (when there is any)."""
    if as_json:
        echo_json(payload)
    elif text is not None:
        click.echo(text)


def parse_reference(text: str, *, default_tag: str | None = "latest") -> Reference:
    try:
        return Reference.parse(text, default_tag=default_tag)
    except InvalidReference as exc:
        raise InvalidReferenceError(str(exc)) from None


class BarProgress:
    """A click progress bar on stderr, safe to advance from several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bar: Any = None

    def start(self, total: int, label: str) -> None:
        with self._lock:
            self._bar = click.progressbar(length=max(total, 1), label=label, file=sys.stderr)
            self._bar.__enter__()

    def advance(self, nbytes: int) -> None:
        with self._lock:
            if self._bar is not None and nbytes > 0:
                self._bar.update(nbytes)

    def finish(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.__exit__(None, None, None)
                self._bar = None


def make_progress(quiet: bool) -> Progress:
    if quiet or not sys.stderr.isatty():
        return NullProgress()
    return BarProgress()


def to_jsonable(value: Any) -> Any:
    # A value can be a pydantic model only if pydantic is loaded: a push or a
    # pull that never loads it does not import it here either.
    pydantic = sys.modules.get("pydantic")
    if pydantic is not None and isinstance(value, pydantic.BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list | tuple):
        return [to_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {key: to_jsonable(item) for key, item in value.items()}
    return value


def echo_json(value: Any) -> None:
    click.echo(json.dumps(to_jsonable(value), indent=2, sort_keys=True))


def echo_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [
        max([len(header)] + [len(row[index]) for row in cells])
        for index, header in enumerate(headers)
    ]
    for row in [list(headers), *cells]:
        click.echo(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


__all__ = [
    "EXIT_ERROR",
    "EXIT_USAGE",
    "PeftregGroup",
    "echo_json",
    "echo_table",
    "emit",
    "fail",
    "human_size",
    "json_option",
    "make_client",
    "make_progress",
    "parse_reference",
]
