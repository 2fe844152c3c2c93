"""Content digests (`sha256:<hex>`), parsed once and hashed in a streaming way."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

# Matched with `fullmatch`: `$` would also match before a final newline.
_DIGEST_RE = re.compile(r"(?P<algorithm>[a-z0-9]+(?:[.+_-][a-z0-9]+)*):(?P<hex>[a-zA-Z0-9=_-]+)")
# The digests this project accepts, as one whole-string pattern (for the OpenAPI document).
DIGEST_PATTERN = "sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}"
_HEX_LENGTHS = {"sha256": 64, "sha512": 128}
READ_CHUNK = 4 * 1024 * 1024


class InvalidDigest(ValueError):
    """A string that is not a digest this project supports."""


@dataclass(frozen=True, order=True)
class Digest:
    """An OCI content digest. Only sha256 is produced; sha512 is accepted."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        match = _DIGEST_RE.fullmatch(text)
        if match is None:
            raise InvalidDigest(f"not a digest: {text!r}")
        algorithm, hex_ = match.group("algorithm"), match.group("hex")
        expected = _HEX_LENGTHS.get(algorithm)
        if expected is None:
            raise InvalidDigest(f"unsupported digest algorithm {algorithm!r} in {text!r}")
        if len(hex_) != expected or not re.fullmatch(r"[0-9a-f]+", hex_):
            raise InvalidDigest(
                f"{algorithm} digest must be {expected} lowercase hex digits: {text!r}"
            )
        return cls(algorithm, hex_)

    @classmethod
    def of_bytes(cls, data: bytes) -> Digest:
        return cls("sha256", hashlib.sha256(data).hexdigest())

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


def digest_stream(stream: BinaryIO, algorithm: str = "sha256") -> tuple[Digest, int]:
    """Hash a readable stream to its end; returns the digest and the size."""
    hasher = hashlib.new(algorithm)
    size = 0
    while chunk := stream.read(READ_CHUNK):
        hasher.update(chunk)
        size += len(chunk)
    return Digest(algorithm, hasher.hexdigest()), size


def digest_chunks(chunks: Iterable[bytes], algorithm: str = "sha256") -> tuple[Digest, int]:
    hasher = hashlib.new(algorithm)
    size = 0
    for chunk in chunks:
        hasher.update(chunk)
        size += len(chunk)
    return Digest(algorithm, hasher.hexdigest()), size


def digest_file(path: Path, algorithm: str = "sha256") -> tuple[Digest, int]:
    with path.open("rb") as stream:
        return digest_stream(stream, algorithm)
