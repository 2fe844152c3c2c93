"""Digests of local files remembered across pushes, keyed by what `stat` says.

A push hashes each large file while it sends it; the digest is remembered
under `<cache>/digests/` with the file's path, device, inode, size and
modification time. A later push of the unchanged file knows its digest
before reading it, so it can ask the registry (HEAD) and skip the upload.
A file changed in place gets a new modification time, so a new key; a
remembered digest is a hint only, the upload itself is always hashed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from pathlib import Path

from peftreg.digest import Digest, InvalidDigest


class DigestMemo:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _entry(self, path: Path) -> Path | None:
        try:
            stat = path.stat()
        except OSError:
            return None
        key = "\0".join(
            str(part)
            for part in (
                path.absolute(),
                stat.st_dev,
                stat.st_ino,
                stat.st_size,
                stat.st_mtime_ns,
            )
        )
        name = hashlib.sha256(key.encode()).hexdigest()
        return self.root / name[:2] / name

    def get(self, path: Path) -> Digest | None:
        entry = self._entry(path)
        if entry is None:
            return None
        try:
            return Digest.parse(entry.read_text().strip())
        except (OSError, InvalidDigest):
            return None

    def put(self, path: Path, digest: Digest) -> None:
        entry = self._entry(path)
        if entry is None:
            return
        with contextlib.suppress(OSError):
            entry.parent.mkdir(parents=True, exist_ok=True)
            staging = entry.with_name(f".{entry.name}.{uuid.uuid4().hex}")
            staging.write_text(str(digest))
            os.replace(staging, entry)
