"""Scopes granted per repository-name pattern, and the principals holding them.

Scopes are ordered: `admin` includes `write`, which includes `read`. A grant
applies to every repository whose name matches its pattern (`fnmatch`, where
`*` also crosses `/`: `acme/*` covers `acme/nlp/bot`).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Literal

Scope = Literal["read", "write", "admin"]
SCOPE_ORDER: dict[str, int] = {"none": 0, "read": 1, "write": 2, "admin": 3}
GLOBAL = "*"


@dataclass(frozen=True)
class Grant:
    pattern: str
    scope: Scope

    def covers(self, repository: str) -> bool:
        return fnmatch.fnmatchcase(repository, self.pattern)


@dataclass(frozen=True)
class Principal:
    """An authenticated caller (or the anonymous one) and its grants."""

    name: str
    grants: tuple[Grant, ...] = field(default_factory=tuple)
    anonymous: bool = False
    token_id: str | None = None
    scoped: bool = False
    """A short-lived registry token limited to the access it names (a client may ask for more)."""

    def can(self, scope: Scope, repository: str) -> bool:
        needed = SCOPE_ORDER[scope]
        return any(
            SCOPE_ORDER[grant.scope] >= needed and grant.covers(repository) for grant in self.grants
        )

    def is_global_admin(self) -> bool:
        return any(g.scope == "admin" and g.pattern == GLOBAL for g in self.grants)


def anonymous_principal(scope: Literal["none", "read", "write", "admin"]) -> Principal:
    grants = () if scope == "none" else (Grant(GLOBAL, scope),)
    return Principal(name="anonymous", grants=grants, anonymous=True)
