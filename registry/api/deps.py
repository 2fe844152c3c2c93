"""FastAPI dependencies as `Annotated` aliases: services, caller, authorization."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from contextlib import AbstractContextManager
from functools import partial
from typing import Annotated, TypeVar

from anyio import to_thread
from fastapi import Depends, Request
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from peftreg.registry.auth import registry_tokens, tokens
from peftreg.registry.auth.scopes import Principal, Scope, anonymous_principal
from peftreg.registry.errors import Denied, InsufficientScope, Unauthorized
from peftreg.registry.state import Services

T = TypeVar("T")
# Numbers in queries are compared with or passed to SQL `integer`s (PostgreSQL's are
# 32-bit); a larger one is refused as a bad request rather than sent to the database.
SQL_INTEGER_MAX = 2**31 - 1


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def presented_token(authorization: str | None) -> str | None:
    """The token in `Bearer <token>` or in HTTP Basic's password (OCI clients)."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer" and value.strip():
        return value.strip()
    if scheme == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise Unauthorized("malformed Basic credentials") from None
        _user, sep, password = decoded.partition(":")
        if not sep or not password:
            raise Unauthorized("Basic credentials need the token as password")
        return password
    raise Unauthorized(f"unsupported authorization scheme {scheme!r}")


def registry_service(request: Request, services: Services) -> str:
    """The name registry tokens are issued for and checked against (their audience)."""
    return services.settings.token_service or request.headers.get("host") or "peftreg"


def identify(services: Services, authorization: str | None, *, service: str) -> Principal:
    """Who presents `authorization`: a peftreg token, the admin token, or a registry token."""
    presented = presented_token(authorization)
    if presented is None:
        return anonymous_principal(services.settings.anonymous_scope())
    admin = services.settings.admin_token
    if admin is not None:
        principal = tokens.bootstrap_admin(presented, admin.get_secret_value())
        if principal is not None:
            return principal
    if registry_tokens.looks_like_registry_token(presented):
        verified = registry_tokens.verify(presented, key=services.token_key, service=service)
        if verified.token_id is not None:
            with services.read_transaction() as session:
                tokens.ensure_active(session, token_id=verified.token_id)
        return verified.principal
    with services.transaction() as session:
        return tokens.authenticate(session, presented=presented)


async def get_principal(request: Request, services: ServicesDep) -> Principal:
    authorization = request.headers.get("authorization")
    if not authorization:
        # Nothing to verify or look up: no hop to a worker thread.
        return anonymous_principal(services.settings.anonymous_scope())
    service = registry_service(request, services)
    return await run_in_threadpool(partial(identify, services, authorization, service=service))


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def authorize(principal: Principal, scope: Scope, repository: str) -> None:
    """Raise unless the principal holds `scope` on `repository`.

    Anonymous callers get 401 (with the challenge, so clients send
    credentials); registry tokens lacking the access get 403 with a challenge
    naming it (so clients fetch a token for it); peftreg tokens lacking the
    grant get 403.
    """
    if principal.can(scope, repository):
        return
    access = f"repository:{repository}:{','.join(registry_tokens.challenge_actions(scope))}"
    if principal.anonymous:
        raise Unauthorized(
            f"authentication required for {scope} access to {repository}", access=access
        )
    if principal.scoped:
        raise InsufficientScope(
            f"the registry token grants no {scope} access to {repository}", access=access
        )
    raise Denied(f"{principal.name} lacks {scope} access to {repository}")


def authorize_any(principal: Principal) -> None:
    """Listings filter by grants, but an anonymous caller holding none gets the challenge."""
    if principal.anonymous and not principal.grants:
        raise Unauthorized("authentication required")


def authorize_global_admin(principal: Principal) -> None:
    if principal.is_global_admin():
        return
    if principal.anonymous:
        raise Unauthorized("authentication required")
    raise Denied(f"{principal.name} is not an administrator")


async def in_read_transaction(services: Services, work: Callable[[Session], T]) -> T:
    """Run read-only `work(session)` in one snapshot on a worker thread (no write lock).

    At most `Settings.db_read_threads` of them run at once in a process; the
    others wait their turn on the event loop instead of contending for the GIL.
    """
    run = partial(_read, services.read_transaction, work)
    return await to_thread.run_sync(run, limiter=services.read_threads)


async def in_read_statements(services: Services, work: Callable[[Session], T]) -> T:
    """Run read-only `work(session)` whose statements each stand alone, on a worker thread.

    For a request's lookups and keyset pages (see `Services.read_statements`):
    on PostgreSQL without BEGIN and COMMIT round trips. Limited as
    `in_read_transaction`.
    """
    run = partial(_read, services.read_statements, work)
    return await to_thread.run_sync(run, limiter=services.read_threads)


def _read(
    session: Callable[[], AbstractContextManager[Session]], work: Callable[[Session], T]
) -> T:
    """`work` in a session; once more on a fresh connection if the pooled one was dead.

    A pooled connection is checked only after it sat idle (`ping_after_idle`):
    one the database dropped since its last request fails the first statement,
    and SQLAlchemy replaces the pool's connections. A read is safe to repeat.
    """
    try:
        with session() as opened:
            return work(opened)
    except DBAPIError as error:
        if not error.connection_invalidated:
            raise
    with session() as opened:
        return work(opened)


async def in_transaction(services: Services, work: Callable[[Session], T]) -> T:
    """Run `work(session)` in one transaction on a worker thread."""

    def run() -> T:
        with services.transaction() as session:
            return work(session)

    return await run_in_threadpool(run)
