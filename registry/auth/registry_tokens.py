"""The registry token flow of docker/distribution, spoken by skopeo, oras, docker, containerd.

A client refused with `401` and a `Bearer realm=...,service=...,scope=...`
challenge asks the realm (`GET /token?service=...&scope=...`), with HTTP Basic
credentials (the password being a peftreg token) or a peftreg bearer token,
for a short-lived token, then repeats its request with `Bearer <that token>`.

The token is a JWT signed with HMAC-SHA256 (the key from settings). It names
the registry it is for (`aud`, the service), an expiry, the peftreg token it
was exchanged for (so revoking that token revokes it), and the access it
carries: per repository, the actions asked for *and* held, so a token never
grants more than its peftreg token, nor more than it was asked for.

Actions map onto peftreg scopes: `pull` = read, `push` = write, `delete` and
`*` = admin.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt

from peftreg.registry.auth.scopes import SCOPE_ORDER, Grant, Principal, Scope
from peftreg.registry.errors import InvalidRequest, Unauthorized

ISSUER = "peftreg"
ALGORITHM = "HS256"
ACTION_SCOPES: dict[str, Scope] = {"pull": "read", "push": "write", "delete": "admin", "*": "admin"}


@dataclass(frozen=True)
class Access:
    """One `type:name:actions` scope of the token protocol."""

    type: str
    name: str
    actions: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Access:
        kind, sep, rest = text.partition(":")
        name, sep2, actions = rest.rpartition(":")
        if not sep or not sep2 or not kind or not name:
            raise InvalidRequest(
                f"scope {text!r} is not TYPE:NAME:ACTIONS (repository:ns/name:pull,push)"
            )
        wanted = tuple(dict.fromkeys(a for a in actions.split(",") if a))
        return cls(kind, name, wanted)

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(self.actions)}"

    def as_claim(self) -> dict[str, Any]:
        return {"type": self.type, "name": self.name, "actions": list(self.actions)}


def parse_scopes(values: Iterable[str]) -> list[Access]:
    """Scopes as clients send them: repeated parameters, or several separated by spaces."""
    return [Access.parse(part) for value in values for part in value.split() if part]


def granted_access(principal: Principal, requested: Iterable[Access]) -> list[Access]:
    """What of `requested` the principal holds: unknown types and actions are dropped."""
    granted = []
    for access in requested:
        if access.type != "repository":
            continue
        held = tuple(
            action
            for action in access.actions
            if action in ACTION_SCOPES and principal.can(ACTION_SCOPES[action], access.name)
        )
        if held:
            granted.append(Access(access.type, access.name, held))
    return granted


def challenge_actions(scope: Scope) -> tuple[str, ...]:
    """The actions a challenge asks for to cover `scope`."""
    return {"read": ("pull",), "write": ("pull", "push"), "admin": ("*",)}[scope]


def access_scope(actions: Iterable[str]) -> Scope | None:
    """The widest peftreg scope the actions amount to."""
    best: Scope | None = None
    for action in actions:
        scope = ACTION_SCOPES.get(action)
        if scope is not None and (best is None or SCOPE_ORDER[scope] > SCOPE_ORDER[best]):
            best = scope
    return best


def issue(
    *,
    key: bytes,
    service: str,
    principal: Principal,
    access: list[Access],
    lifetime: timedelta,
    now: datetime | None = None,
) -> tuple[str, datetime]:
    """A signed token and the moment it was issued."""
    issued = (now or datetime.now(UTC)).replace(microsecond=0)
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "sub": principal.name,
        "aud": service,
        "iat": issued,
        "nbf": issued - timedelta(seconds=5),
        "exp": issued + lifetime,
        "access": [item.as_claim() for item in access],
    }
    if principal.token_id is not None:
        claims["peftreg_token"] = principal.token_id
    return jwt.encode(claims, key, algorithm=ALGORITHM), issued


@dataclass(frozen=True)
class VerifiedToken:
    principal: Principal
    token_id: str | None


def verify(presented: str, *, key: bytes, service: str) -> VerifiedToken:
    """The principal a registry token stands for; `Unauthorized` names why not."""
    try:
        claims = jwt.decode(
            presented,
            key,
            algorithms=[ALGORITHM],
            audience=service,
            issuer=ISSUER,
            options={"require": ["exp", "aud", "iss", "sub"]},
        )
    except jwt.ExpiredSignatureError:
        raise Unauthorized("registry token has expired") from None
    except jwt.InvalidAudienceError:
        raise Unauthorized(
            f"registry token was issued for another registry, not {service}"
        ) from None
    except jwt.PyJWTError as exc:
        raise Unauthorized(f"invalid registry token: {exc}") from None
    grants = []
    for item in claims.get("access") or []:
        if not isinstance(item, dict) or item.get("type") != "repository":
            continue
        scope = access_scope(str(action) for action in item.get("actions") or [])
        name = item.get("name")
        if scope is not None and isinstance(name, str) and name:
            grants.append(Grant(_literal_pattern(name), scope))
    token_id = claims.get("peftreg_token")
    principal = Principal(
        name=str(claims["sub"]),
        grants=tuple(grants),
        token_id=token_id if isinstance(token_id, str) else None,
        scoped=True,
    )
    return VerifiedToken(principal, principal.token_id)


def _literal_pattern(name: str) -> str:
    """A grant pattern matching exactly `name` (fnmatch's metacharacters escaped)."""
    return "".join(f"[{char}]" if char in "*?[" else char for char in name)


def looks_like_registry_token(presented: str) -> bool:
    return presented.count(".") == 2 and presented.startswith("ey")
