"""Object keys of the S3 backend, and which segments make up an upload session."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from peftreg.digest import Digest, InvalidDigest

# `<offset:020d>-<writer nonce>`; the nonce-less form is the chunk name of
# earlier releases, read as a segment so sessions open across an upgrade resume.
_SEGMENT_NAME = re.compile(r"^([0-9]{20})(?:-([0-9a-f]{16}))?$")
MARKER_NAME = "_started"


@dataclass(frozen=True)
class KeyLayout:
    """Every object key the backend uses, derived in this one place.

    Layout under the bucket (`prefix` is `s3_prefix` with a trailing ``/``,
    or empty)::

        <prefix>
          blobs/<algorithm>/<hex[:2]>/<hex>     verified, content-addressed blobs
          uploads/<upload id>/
            _started                            marker: the session exists (even empty)
            <offset:020d>-<nonce>               segment: the bytes one writer appended
                                                from offset (a multipart upload until
                                                the writer closes, so never partial)

    Offsets are zero-padded so that listing order is offset order; the nonce
    makes every segment key unique, so a stored segment never changes. An
    upload's bytes never live under `blobs/`: they reach it by a server-side
    copy that `commit_upload` starts after verifying the digest.
    """

    prefix: str = ""

    @classmethod
    def from_prefix(cls, prefix: str) -> KeyLayout:
        prefix = prefix.strip("/")
        return cls(f"{prefix}/" if prefix else "")

    @property
    def blobs(self) -> str:
        return f"{self.prefix}blobs/"

    @property
    def uploads(self) -> str:
        return f"{self.prefix}uploads/"

    def blob(self, digest: Digest) -> str:
        return f"{self.blobs}{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"

    def upload(self, upload_id: str) -> str:
        return f"{self.uploads}{upload_id}/"

    def marker(self, upload_id: str) -> str:
        return f"{self.upload(upload_id)}{MARKER_NAME}"

    def segment(self, upload_id: str, offset: int) -> str:
        """A fresh, never used key for a segment starting at `offset`."""
        return f"{self.upload(upload_id)}{offset:020d}-{secrets.token_hex(8)}"

    def parse_blob(self, key: str) -> Digest | None:
        """The digest a key under `blobs/` names, or None for a stray key."""
        parts = key.removeprefix(self.blobs).split("/")
        if not key.startswith(self.blobs) or len(parts) != 3:
            return None
        algorithm, fanout, hex_ = parts
        try:
            digest = Digest.parse(f"{algorithm}:{hex_}")
        except InvalidDigest:
            return None
        return digest if fanout == hex_[:2] else None

    def parse_upload(self, key: str) -> tuple[str, str] | None:
        """(upload id, object name) of a key under `uploads/`."""
        parts = key.removeprefix(self.uploads).split("/")
        if not key.startswith(self.uploads) or len(parts) != 2 or not parts[0]:
            return None
        return parts[0], parts[1]


@dataclass(frozen=True)
class Segment:
    offset: int
    size: int
    key: str

    @property
    def end(self) -> int:
        return self.offset + self.size


def segment_offset(name: str) -> int | None:
    """The offset a segment's object name starts at, or None for other objects."""
    match = _SEGMENT_NAME.match(name)
    return int(match.group(1)) if match else None


def contiguous(segments: Iterable[Segment]) -> tuple[list[Segment], list[Segment]]:
    """(the session's segments from offset 0, stale ones).

    A segment belongs to the session only if it starts exactly where the
    previous one ended. Of several starting at one offset the longest wins
    (a writer that took over a short last segment wrote it again, longer,
    and deletes the old one after), then the first by key, so every
    replica picks the same ones. Anything else is a leftover of a writer
    that was cancelled or crashed (or an empty object, never written).
    """
    ordered = sorted(segments, key=lambda s: (s.offset, -s.size, s.key))
    chosen: list[Segment] = []
    stale: list[Segment] = []
    position = 0
    for segment in ordered:
        if segment.offset == position and segment.size > 0:
            chosen.append(segment)
            position = segment.end
        else:
            stale.append(segment)
    return chosen, stale
