"""`SessionBlobWriter`: a blob of known digest written through an upload session.

For a backend whose session commit costs nothing more than a direct write
would (the filesystem's commit is an fsync and a rename): the bytes go to an
anonymous session, and `publish` commits it. A session nobody publishes is
removed by `cancel`, or, after a crash, by garbage collection like any
session without a row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from peftreg.digest import Digest
from peftreg.registry.storage.base import BlobIngester, UploadWriter


class SessionBlobWriter:
    def __init__(self, store: BlobIngester, digest: Digest) -> None:
        self._store = store
        self._digest = digest
        self._upload_id = store.create_upload()
        try:
            self._writer: UploadWriter = store.open_writer(self._upload_id, 0)
        except BaseException:
            store.abort_upload(self._upload_id)
            raise
        self._state: Literal["open", "closed", "done"] = "open"

    def write(self, data: bytes) -> None:
        self._writer.write(data)

    def write_many(self, chunks: Sequence[bytes]) -> None:
        self._writer.write_many(chunks)

    def local_fd(self) -> int | None:
        return self._writer.local_fd()

    def appended(self, nbytes: int) -> None:
        self._writer.appended(nbytes)

    def close(self) -> int:
        size = self._writer.close()
        self._state = "closed"
        return size

    def publish(self) -> int:
        if self._state == "open":
            self.close()
        self._state = "done"
        return self._store.commit_upload(self._upload_id, self._digest)

    def cancel(self) -> None:
        if self._state == "done":
            return
        if self._state == "open":
            self._writer.cancel()
        self._state = "done"
        self._store.abort_upload(self._upload_id)
