"""How transfers report progress: a tiny protocol the CLI implements with a bar."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Receives byte counts from transfers (possibly from several threads)."""

    def start(self, total: int, label: str) -> None: ...

    def advance(self, nbytes: int) -> None: ...

    def finish(self) -> None: ...


class NullProgress:
    """Progress that shows nothing."""

    def start(self, total: int, label: str) -> None:
        return None

    def advance(self, nbytes: int) -> None:
        return None

    def finish(self) -> None:
        return None
