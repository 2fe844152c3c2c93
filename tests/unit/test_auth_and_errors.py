from __future__ import annotations

import inspect

import pytest

from peftreg.registry import errors
from peftreg.registry.api.deps import presented_token
from peftreg.registry.api.errors import ERROR_TABLE, status_and_code
from peftreg.registry.api.routes.oci_blobs import parse_range
from peftreg.registry.auth.scopes import Grant, Principal, anonymous_principal
from peftreg.registry.auth.tokens import bootstrap_admin
from peftreg.registry.settings import Settings


def test_scopes_are_ordered_and_patterns_cross_namespaces() -> None:
    reader = Principal("r", (Grant("acme/*", "read"),))
    assert reader.can("read", "acme/nlp/bot")
    assert not reader.can("write", "acme/bot")
    assert not reader.can("read", "other/bot")
    admin = Principal("a", (Grant("*", "admin"),))
    assert admin.can("write", "anything/at/all")
    assert admin.is_global_admin()
    assert not Principal("w", (Grant("acme/*", "admin"),)).is_global_admin()


def test_anonymous_access_follows_the_bind_address() -> None:
    assert Settings(host="127.0.0.1").anonymous_scope() == "admin"
    assert Settings(host="0.0.0.0").anonymous_scope() == "none"
    assert Settings(host="0.0.0.0", anonymous="read").anonymous_scope() == "read"
    assert not anonymous_principal("none").can("read", "x")


def test_token_is_taken_from_bearer_or_basic_password() -> None:
    assert presented_token("Bearer abc") == "abc"
    assert presented_token("Basic dXNlcjpzM2NyZXQ=") == "s3cret"  # user:s3cret
    assert presented_token(None) is None
    with pytest.raises(errors.Unauthorized):
        presented_token("Basic !!!")
    with pytest.raises(errors.Unauthorized):
        presented_token("Digest x")


def test_bootstrap_admin_matches_exactly() -> None:
    assert bootstrap_admin("secret", "secret") is not None
    assert bootstrap_admin("secret2", "secret") is None


def test_every_domain_error_has_a_status_and_code() -> None:
    classes = [
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.RegistryError) and cls is not errors.RegistryError
    ]
    assert classes
    for cls in classes:
        assert cls in ERROR_TABLE, f"{cls.__name__} is not mapped to an HTTP status"
    status, code = status_and_code(errors.RangeInvalid("x", current_size=3))
    assert (status, code) == (416, "RANGE_INVALID")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-", (0, 10)),
        ("bytes=2-4", (2, 5)),
        ("bytes=-3", (7, 10)),
        ("bytes=5-100", (5, 10)),
    ],
)
def test_range_parsing(header: str | None, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, 10) == expected


@pytest.mark.parametrize("header", ["bytes=10-", "bytes=abc", "bytes=-", "items=0-1", "bytes=4-2"])
def test_unsatisfiable_ranges(header: str) -> None:
    with pytest.raises(errors.RangeInvalid):
        parse_range(header, 10)
