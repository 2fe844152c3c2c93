"""API tokens: random secrets shown once, stored as hashes, checked in constant time.

A token reads `prt_<id>_<secret>`. The id finds the row; the secret's
sha256 is compared with `hmac.compare_digest`. Secrets carry 256 bits of
randomness, so a fast hash is the right tool (no password stretching needed).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from peftreg.registry.auth.scopes import SCOPE_ORDER, Grant, Principal
from peftreg.registry.db.models import ApiToken
from peftreg.registry.errors import InvalidRequest, TokenUnknown, Unauthorized

TOKEN_PREFIX = "prt_"  # noqa: S105 - a public prefix, not a secret


@dataclass(frozen=True)
class IssuedToken:
    id: str
    name: str
    secret: str
    grants: list[dict[str, Any]]


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_grants(raw: list[dict[str, Any]]) -> tuple[Grant, ...]:
    grants = []
    for item in raw:
        pattern, scope = item.get("pattern"), item.get("scope")
        if not isinstance(pattern, str) or not pattern:
            raise InvalidRequest(f"grant {item!r}: 'pattern' must be a non-empty string")
        if scope not in ("read", "write", "admin"):
            raise InvalidRequest(f"grant {item!r}: 'scope' must be read, write or admin")
        grants.append(Grant(pattern, scope))
    if not grants:
        raise InvalidRequest("a token needs at least one grant")
    return tuple(grants)


def create_token(
    session: Session,
    *,
    name: str,
    grants: list[dict[str, Any]],
    created_by: str,
    expires_at: datetime | None = None,
) -> IssuedToken:
    parsed = parse_grants(grants)
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    normalized = [{"pattern": g.pattern, "scope": g.scope} for g in parsed]
    session.add(
        ApiToken(
            id=token_id,
            name=name,
            secret_hash=_hash(secret),
            grants=normalized,
            created_by=created_by,
            created_at=datetime.now(UTC),
            expires_at=expires_at,
            revoked_at=None,
        )
    )
    session.flush()
    return IssuedToken(token_id, name, f"{TOKEN_PREFIX}{token_id}_{secret}", normalized)


def list_tokens(session: Session) -> list[ApiToken]:
    return list(session.scalars(select(ApiToken).order_by(ApiToken.created_at)))


def revoke_token(session: Session, *, token_id: str) -> ApiToken:
    token = session.get(ApiToken, token_id)
    if token is None:
        raise TokenUnknown(f"no token with id {token_id!r}")
    if token.revoked_at is None:
        token.revoked_at = datetime.now(UTC)
    return token


def authenticate(session: Session, *, presented: str) -> Principal:
    """The principal a presented token stands for; raises `Unauthorized`."""
    if not presented.startswith(TOKEN_PREFIX):
        raise Unauthorized("malformed token")
    token_id, sep, secret = presented[len(TOKEN_PREFIX) :].partition("_")
    if not sep:
        raise Unauthorized("malformed token")
    row = session.get(ApiToken, token_id)
    expected = row.secret_hash if row is not None else _hash("")
    matches = hmac.compare_digest(_hash(secret), expected)
    if row is None or not matches:
        raise Unauthorized("invalid token")
    _check_active(row)
    return Principal(name=f"token:{row.name}", grants=parse_grants(row.grants), token_id=row.id)


def ensure_active(session: Session, *, token_id: str) -> None:
    """Raise `Unauthorized` unless the token still exists, unrevoked and unexpired."""
    row = session.get(ApiToken, token_id)
    if row is None:
        raise Unauthorized("the token this registry token was issued for no longer exists")
    _check_active(row)


def _check_active(row: ApiToken) -> None:
    now = datetime.now(UTC)
    if row.revoked_at is not None:
        raise Unauthorized("token has been revoked")
    if row.expires_at is not None and _aware(row.expires_at) <= now:
        raise Unauthorized("token has expired")


def bootstrap_admin(presented: str, admin_token: str) -> Principal | None:
    """The operator's bootstrap admin token from settings, compared in constant time."""
    if hmac.compare_digest(presented.encode(), admin_token.encode()):
        return Principal(name="admin", grants=(Grant("*", "admin"),))
    return None


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


__all__ = ["SCOPE_ORDER", "IssuedToken", "authenticate", "create_token", "list_tokens"]
