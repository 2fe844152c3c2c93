"""`namespace/name:tag` and `namespace/name@sha256:<hex>` references.

A reference may start with a registry host, as docker and oras write them:
`127.0.0.1:8750/acme/bot:v1`, `localhost:5000/acme/bot`, `registry.example.com/acme/bot`.
The first segment is a host when it holds a `.` or a `:`, or is `localhost`
(docker's rule).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from peftreg.digest import DIGEST_PATTERN, Digest, InvalidDigest
from peftreg.names import (
    MAX_REPOSITORY_LENGTH,
    REPOSITORY_PATTERN,
    TAG_PATTERN,
    InvalidName,
    check_repository_name,
    check_tag,
)

# `repository`, `repository:tag` or `repository@digest`, as a JSON Schema (ECMA) pattern;
# the lookahead bounds the repository's length.
REFERENCE_SCHEMA_PATTERN = (
    rf"^(?=[^:@]{{1,{MAX_REPOSITORY_LENGTH}}}(?:[:@]|$))"
    rf"{REPOSITORY_PATTERN}(?::{TAG_PATTERN}|@(?:{DIGEST_PATTERN}))?$"
)


class InvalidReference(ValueError):
    """A string that is not a repository reference."""


_HOST_RE = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$"
)


def split_registry(text: str) -> tuple[str | None, str]:
    """(registry host or None, the rest) of a reference, by docker's rule."""
    first, sep, rest = text.partition("/")
    if not sep or not ("." in first or ":" in first or first == "localhost"):
        return None, text
    if not _HOST_RE.match(first):
        raise InvalidReference(f"invalid reference {text!r}: {first!r} is not a registry host")
    return first, rest


@dataclass(frozen=True)
class Reference:
    repository: str
    tag: str | None = None
    digest: Digest | None = None
    registry: str | None = None  # host[:port] when the reference names one

    @classmethod
    def parse(cls, text: str, *, default_tag: str | None = "latest") -> Reference:
        registry, rest = split_registry(text)
        parsed = cls._parse_local(rest, text, default_tag)
        return cls(parsed.repository, parsed.tag, parsed.digest, registry)

    @classmethod
    def _parse_local(cls, text: str, original: str, default_tag: str | None) -> Reference:
        try:
            if "@" in text:
                repository, _, digest_text = text.partition("@")
                return cls(check_repository_name(repository), None, Digest.parse(digest_text))
            repository, sep, tag = text.rpartition(":")
            if not sep or "/" in tag:
                repository, tag = text, ""
            if not tag:
                if default_tag is None:
                    raise InvalidReference(f"{original!r} names no tag or digest")
                tag = default_tag
            return cls(check_repository_name(repository), check_tag(tag), None)
        except (InvalidName, InvalidDigest) as exc:
            raise InvalidReference(f"invalid reference {original!r}: {exc}") from None

    @property
    def identifier(self) -> str:
        """What goes after `/manifests/` in the OCI API: the digest or the tag."""
        if self.digest is not None:
            return str(self.digest)
        assert self.tag is not None
        return self.tag

    def __str__(self) -> str:
        """The reference within its registry (without the host)."""
        if self.digest is not None:
            return f"{self.repository}@{self.digest}"
        return f"{self.repository}:{self.tag}"
