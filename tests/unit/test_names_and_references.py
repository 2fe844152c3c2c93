from __future__ import annotations

import pytest

from peftreg.digest import Digest, InvalidDigest
from peftreg.names import InvalidName, check_repository_name, check_tag
from peftreg.reference import InvalidReference, Reference


@pytest.mark.parametrize(
    "name", ["acme/bot", "a", "acme/nlp/support-bot", "a.b_c__d--e/x9", "x" * 255]
)
def test_valid_repository_names(name: str) -> None:
    assert check_repository_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        *["", "../x", "A/B", "a//b", "a/", "/a", "-a", "a-", "a..b", "a b", "a/.x", "x" * 256],
        *["acme/bot\n", "acme/bot\r\n", "\nacme/bot"],
    ],
)
def test_invalid_repository_names_name_the_problem(name: str) -> None:
    with pytest.raises(InvalidName, match="repository name"):
        check_repository_name(name)


@pytest.mark.parametrize("tag", ["v1", "latest", "prod", "V1.2.3-rc_1", "_x", "a" * 128])
def test_valid_tags(tag: str) -> None:
    assert check_tag(tag) == tag


@pytest.mark.parametrize(
    "tag", ["", ".x", "-x", "a/b", "a:b", "a" * 129, "prod\n", "a" * 128 + "\n"]
)
def test_invalid_tags(tag: str) -> None:
    with pytest.raises(InvalidName, match="invalid tag"):
        check_tag(tag)


def test_digest_parse_and_format_round_trip() -> None:
    text = "sha256:" + "ab" * 32
    assert str(Digest.parse(text)) == text
    assert Digest.of_bytes(b"hello").hex.startswith("2cf24dba")


@pytest.mark.parametrize(
    "text",
    ["sha256:abc", "md5:" + "a" * 32, "sha256:" + "A" * 64, "nocolon", "sha256:" + "g" * 64],
)
def test_invalid_digests(text: str) -> None:
    with pytest.raises(InvalidDigest):
        Digest.parse(text)


def test_reference_forms() -> None:
    assert Reference.parse("acme/bot:v7") == Reference("acme/bot", "v7")
    assert Reference.parse("acme/bot").tag == "latest"
    digest = "sha256:" + "c" * 64
    by_digest = Reference.parse(f"acme/bot@{digest}")
    assert by_digest.digest == Digest.parse(digest)
    assert by_digest.identifier == digest
    assert str(by_digest) == f"acme/bot@{digest}"


@pytest.mark.parametrize("text", ["Acme/bot:v1", "acme/bot:", "acme/bot@sha256:zz", "acme//bot"])
def test_invalid_references(text: str) -> None:
    with pytest.raises(InvalidReference):
        Reference.parse(text, default_tag=None)


@pytest.mark.parametrize(
    "text",
    ["acme/bot:prod\n", "acme/bot\n:prod", "acme/bot@sha256:" + "ab" * 32 + "\n"],
)
def test_a_trailing_newline_is_no_part_of_a_reference(text: str) -> None:
    """`$` matches before a final newline: every pattern is anchored at the true end."""
    with pytest.raises(InvalidReference):
        Reference.parse(text)
    with pytest.raises(InvalidDigest):
        Digest.parse("sha256:" + "ab" * 32 + "\n")
