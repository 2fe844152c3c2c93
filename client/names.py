"""Repository names and tags, validated the same way by client and server.

Repository names follow the OCI distribution grammar: slash-separated
lowercase segments of `[a-z0-9]` joined by `.`, `_`, `__` or runs of `-`,
so namespaces nest (`acme/nlp/support-bot`).
"""

from __future__ import annotations

import re

_SEGMENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
# Whole-string patterns (matched with `fullmatch`: `$` would also match before a
# final newline, letting `prod\n` pass as a tag); also published in the OpenAPI document.
REPOSITORY_PATTERN = rf"{_SEGMENT}(?:/{_SEGMENT})*"
TAG_PATTERN = r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}"
REPOSITORY_RE = re.compile(REPOSITORY_PATTERN)
TAG_RE = re.compile(TAG_PATTERN)
MAX_REPOSITORY_LENGTH = 255


class InvalidName(ValueError):
    """A repository name or tag that the OCI grammar does not allow."""


def check_repository_name(name: str) -> str:
    if not name:
        raise InvalidName("repository name is empty")
    if len(name) > MAX_REPOSITORY_LENGTH:
        raise InvalidName(f"repository name is longer than {MAX_REPOSITORY_LENGTH} characters")
    if not REPOSITORY_RE.fullmatch(name):
        raise InvalidName(
            f"invalid repository name {name!r}: use lowercase segments of [a-z0-9] "
            "joined by '.', '_' or '-', separated by '/' (e.g. acme/support-bot)"
        )
    return name


def check_tag(tag: str) -> str:
    if not TAG_RE.fullmatch(tag):
        raise InvalidName(
            f"invalid tag {tag!r}: up to 128 characters of [A-Za-z0-9_.-], "
            "not starting with '.' or '-'"
        )
    return tag
