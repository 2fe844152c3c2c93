"""`namespace/name:tag` and `namespace/name@sha256:<hex>` references."""

from __future__ import annotations

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


@dataclass(frozen=True)
class Reference:
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str, *, default_tag: str | None = "latest") -> Reference:
        try:
            if "@" in text:
                repository, _, digest_text = text.partition("@")
                return cls(check_repository_name(repository), None, Digest.parse(digest_text))
            repository, sep, tag = text.rpartition(":")
            if not sep or "/" in tag:
                repository, tag = text, ""
            if not tag:
                if default_tag is None:
                    raise InvalidReference(f"{text!r} names no tag or digest")
                tag = default_tag
            return cls(check_repository_name(repository), check_tag(tag), None)
        except (InvalidName, InvalidDigest) as exc:
            raise InvalidReference(f"invalid reference {text!r}: {exc}") from None

    @property
    def identifier(self) -> str:
        """What goes after `/manifests/` in the OCI API: the digest or the tag."""
        if self.digest is not None:
            return str(self.digest)
        assert self.tag is not None
        return self.tag

    def __str__(self) -> str:
        if self.digest is not None:
            return f"{self.repository}@{self.digest}"
        return f"{self.repository}:{self.tag}"
