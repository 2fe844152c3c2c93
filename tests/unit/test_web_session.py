"""The web UI's session cookie: signed, expiring, and a CSRF token per session."""

from __future__ import annotations

import base64
import json

from peftreg.registry.web.session import SessionCodec, WebSession


def test_a_session_round_trips_and_a_tampered_one_is_refused() -> None:
    codec = SessionCodec(b"k" * 32)
    session = codec.new("prt_abc_secret")
    value = codec.encode(session)
    assert codec.decode(value) == session

    payload, signature = value.rsplit(".", 1)
    document = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    document["t"] = "prt_other_secret"
    forged = base64.urlsafe_b64encode(json.dumps(document).encode()).decode().rstrip("=")
    assert codec.decode(f"{forged}.{signature}") is None
    assert SessionCodec(b"x" * 32).decode(value) is None  # another replica's key
    assert codec.decode("garbage") is None
    assert codec.decode(None) is None


def test_an_expired_session_is_refused_and_csrf_tokens_differ_per_session() -> None:
    codec = SessionCodec(b"k" * 32)
    expired = WebSession("sid", None, expires=1)
    assert codec.decode(codec.encode(expired)) is None
    first, second = codec.new(), codec.new()
    assert codec.csrf_token(first) != codec.csrf_token(second)
    assert codec.csrf_token(first) == codec.csrf_token(codec.decode(codec.encode(first)))  # type: ignore[arg-type]
