"""One conformance suite for every `BlobStore` backend (see registry/storage/base.py).

Each test in the first part runs against the filesystem backend and against
S3 (SeaweedFS), both opened through `open_blob_store`. The last sections hold
the checks that only make sense for one backend.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import socket
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from peftreg.digest import Digest
from peftreg.registry.settings import Settings
from peftreg.registry.storage.base import BlobStore
from peftreg.registry.storage.errors import (
    BlobNotFound,
    DigestMismatch,
    StorageUnavailable,
    UploadBusy,
    UploadNotFound,
    UploadOffsetMismatch,
)
from peftreg.registry.storage.factory import open_blob_store
from peftreg.registry.storage.s3 import S3BlobStore
from tests.fixtures.seaweed import SeaweedS3
from tests.storage.conftest import S3_PREFIX, SettingsFactory

MiB = 1024 * 1024


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def upload(store: BlobStore, *chunks: bytes) -> str:
    """A new upload holding `chunks`, each written by its own writer."""
    upload_id = store.create_upload()
    offset = 0
    for chunk in chunks:
        writer = store.open_writer(upload_id, offset)
        writer.write(chunk)
        offset = writer.close()
    return upload_id


def store_blob(store: BlobStore, data: bytes) -> Digest:
    digest = Digest.of_bytes(data)
    assert store.commit_upload(upload(store, data), digest) == len(data)
    return digest


def read_all(store: BlobStore, digest: Digest, start: int = 0, end: int | None = None) -> bytes:
    return b"".join(store.read(digest, start, end))


# --- every backend ---------------------------------------------------------


def test_upload_and_commit_round_trip(blob_store: BlobStore) -> None:
    data = b"adapter weights" * 1000
    digest = Digest.of_bytes(data)
    upload_id = upload(blob_store, data)
    assert blob_store.upload_size(upload_id) == len(data)

    assert blob_store.commit_upload(upload_id, digest) == len(data)

    assert blob_store.stat(digest) == len(data)
    assert read_all(blob_store, digest) == data
    assert list(blob_store.list_digests()) == [digest]
    with pytest.raises(UploadNotFound):
        blob_store.upload_size(upload_id)


def test_racing_writers_never_publish_unverified_bytes(blob_store: BlobStore) -> None:
    """Two writers at one offset, interleaved: a backend either refuses the second
    (UploadBusy) or publishes only bytes that hash to the committed digest."""
    a1, a2, b = payload(MiB, 1), payload(MiB, 2), payload(2 * MiB, 3)
    claimed = Digest.of_bytes(a1 + a2)
    upload_id = blob_store.create_upload()
    first = blob_store.open_writer(upload_id, 0)
    try:
        second = blob_store.open_writer(upload_id, 0)
    except UploadBusy:
        first.write(a1 + a2)
        first.close()
        held = blob_store.open_writer(upload_id, 2 * MiB)
        with pytest.raises(UploadBusy):  # no commit while a writer holds the session
            blob_store.commit_upload(upload_id, claimed)
        held.close()
        assert blob_store.commit_upload(upload_id, claimed) == 2 * MiB
        assert read_all(blob_store, claimed) == a1 + a2
        return
    first.write(a1)
    second.write(b)
    second.close()
    first.write(a2)
    first.close()
    try:
        blob_store.commit_upload(upload_id, claimed)
    except DigestMismatch:
        with pytest.raises(BlobNotFound):
            blob_store.stat(claimed)
        return
    assert Digest.of_bytes(read_all(blob_store, claimed)) == claimed


def test_empty_blob(blob_store: BlobStore) -> None:
    digest = Digest.of_bytes(b"")
    upload_id = blob_store.create_upload()
    assert blob_store.upload_size(upload_id) == 0
    assert blob_store.commit_upload(upload_id, digest) == 0
    assert blob_store.stat(digest) == 0
    assert read_all(blob_store, digest) == b""
    assert read_all(blob_store, digest, 0, 0) == b""


def test_chunked_appends_across_writers(blob_store: BlobStore) -> None:
    chunks = [b"a" * 10, b"", b"b" * 4096, b"c", b"d" * 70_000]
    upload_id = blob_store.create_upload()
    size = 0
    for chunk in chunks:
        # A resuming client asks for the size, then appends from there.
        assert blob_store.upload_size(upload_id) == size
        writer = blob_store.open_writer(upload_id, size)
        for start in range(0, len(chunk), 1000):
            writer.write(chunk[start : start + 1000])
        size = writer.close()
        assert size == blob_store.upload_size(upload_id)
    data = b"".join(chunks)
    assert size == len(data)

    assert blob_store.commit_upload(upload_id, Digest.of_bytes(data)) == len(data)
    assert read_all(blob_store, Digest.of_bytes(data)) == data


def test_write_many_appends_the_chunks_in_order(blob_store: BlobStore) -> None:
    """More chunks than one `writev` takes, empty ones among them, across S3 part boundaries."""
    rng = random.Random(7)
    chunks = [payload(rng.choice((0, 1, 4096, 9000)), seed=i) for i in range(2500)]
    chunks.append(payload(6 * MiB, seed=2))
    data = b"".join(chunks)
    upload_id = blob_store.create_upload()
    writer = blob_store.open_writer(upload_id, 0)
    writer.write_many(chunks[:1200])
    writer.write(b"")
    writer.write_many(chunks[1200:])
    assert writer.close() == len(data) == blob_store.upload_size(upload_id)

    assert blob_store.commit_upload(upload_id, Digest.of_bytes(data)) == len(data)
    assert read_all(blob_store, Digest.of_bytes(data)) == data


def test_bytes_the_kernel_appends_to_the_local_file_are_hashed_and_kept(
    blob_store: BlobStore,
) -> None:
    """What `peftreg.receive_into` does: writes to `local_fd` at its end, then `appended`."""
    first, spliced, last = payload(5000, seed=3), payload(5 * MiB + 3, seed=4), b"tail"
    data = first + spliced + last
    upload_id = blob_store.create_upload()
    writer = blob_store.open_writer(upload_id, 0)
    fd = writer.local_fd()
    if fd is None:  # a store without local files: the server reads the body itself
        writer.cancel()
        return
    writer.write(first)
    for start in range(0, len(spliced), MiB):  # as the kernel lands it, piece by piece
        piece = spliced[start : start + MiB]
        assert os.write(fd, piece) == len(piece)
        writer.appended(len(piece))
    writer.write(last)
    assert writer.close() == len(data) == blob_store.upload_size(upload_id)

    assert blob_store.commit_upload(upload_id, Digest.of_bytes(data)) == len(data)
    assert read_all(blob_store, Digest.of_bytes(data)) == data


def test_a_cancelled_writer_drops_what_the_kernel_appended(blob_store: BlobStore) -> None:
    upload_id = blob_store.create_upload()
    writer = blob_store.open_writer(upload_id, 0)
    writer.write(b"kept")
    assert writer.close() == 4
    writer = blob_store.open_writer(upload_id, 4)
    fd = writer.local_fd()
    if fd is None:
        writer.cancel()
        return
    os.write(fd, b"dropped")
    writer.appended(7)
    writer.cancel()
    assert blob_store.upload_size(upload_id) == 4
    writer = blob_store.open_writer(upload_id, 4)
    writer.write(b" and more")
    assert writer.close() == 13
    assert blob_store.commit_upload(upload_id, Digest.of_bytes(b"kept and more")) == 13


def test_writers_of_other_replicas_and_rehash(store_settings: Settings) -> None:
    """Sessions written by several processes are re-hashed from the stored bytes."""
    first, second, third = (open_blob_store(store_settings) for _ in range(3))
    data = payload(300_000, seed=1)
    upload_id = first.create_upload()
    writer = first.open_writer(upload_id, 0)
    writer.write(data[:100_000])
    assert writer.close() == 100_000
    writer = second.open_writer(upload_id, 100_000)
    writer.write(data[100_000:])
    assert writer.close() == len(data)

    assert third.commit_upload(upload_id, Digest.of_bytes(data)) == len(data)
    assert read_all(first, Digest.of_bytes(data)) == data


def test_sha512_digest(blob_store: BlobStore) -> None:
    data = b"sha512 is accepted"
    digest = Digest("sha512", hashlib.sha512(data).hexdigest())
    assert blob_store.commit_upload(upload(blob_store, data), digest) == len(data)
    assert read_all(blob_store, digest) == data
    assert list(blob_store.list_digests()) == [digest]


@pytest.mark.parametrize("given", [0, 5, 11])
def test_offset_mismatch(blob_store: BlobStore, given: int) -> None:
    upload_id = upload(blob_store, b"0123456789")
    with pytest.raises(UploadOffsetMismatch) as caught:
        blob_store.open_writer(upload_id, given)
    assert (caught.value.expected, caught.value.given) == (10, given)
    assert blob_store.upload_size(upload_id) == 10


@pytest.mark.parametrize("size", [1000, 9 * MiB], ids=["small", "multipart"])
@pytest.mark.parametrize("hashed_by", ["writer", "replica"])
def test_digest_mismatch_leaves_nothing(
    store_settings: Settings, blob_store: BlobStore, size: int, hashed_by: str
) -> None:
    data = payload(size, seed=2)
    claimed = Digest.of_bytes(b"something else")
    upload_id = upload(blob_store, data[: size // 3], data[size // 3 :])
    # The writer's running hash fails the commit early; another replica
    # has no running hash and must hash the stored bytes.
    committer = blob_store if hashed_by == "writer" else open_blob_store(store_settings)

    with pytest.raises(DigestMismatch) as caught:
        committer.commit_upload(upload_id, claimed)

    assert caught.value.expected == claimed
    assert caught.value.actual == Digest.of_bytes(data)
    assert caught.value.size == size
    for digest in (claimed, Digest.of_bytes(data)):
        with pytest.raises(BlobNotFound):
            blob_store.stat(digest)
    assert list(blob_store.list_digests()) == []
    with pytest.raises(UploadNotFound):
        blob_store.upload_size(upload_id)
    assert [u for u, _ in blob_store.list_uploads()] == []


def test_committing_stored_content_dedups(store_settings: Settings) -> None:
    store, replica = open_blob_store(store_settings), open_blob_store(store_settings)
    data = b"same bytes twice"
    digest = store_blob(store, data)
    again = upload(store, data)
    elsewhere = upload(replica, data)

    assert store.commit_upload(again, digest) == len(data)
    assert replica.commit_upload(elsewhere, digest) == len(data)

    assert list(store.list_digests()) == [digest]
    assert read_all(store, digest) == data
    for upload_id in (again, elsewhere):
        with pytest.raises(UploadNotFound):
            store.upload_size(upload_id)


def test_wrong_bytes_for_a_stored_digest_are_rejected(store_settings: Settings) -> None:
    store, replica = open_blob_store(store_settings), open_blob_store(store_settings)
    data = b"the real content"
    digest = store_blob(store, data)
    for committer in (store, replica):
        upload_id = upload(store, b"impostor")
        with pytest.raises(DigestMismatch):
            committer.commit_upload(upload_id, digest)
        with pytest.raises(UploadNotFound):
            store.upload_size(upload_id)
    assert read_all(store, digest) == data


@pytest.mark.parametrize("size", [0, 1000, 9 * MiB + 3], ids=["empty", "small", "parts"])
def test_a_blob_written_with_its_digest_appears_only_when_published(
    blob_store: BlobStore, size: int
) -> None:
    data = payload(size, seed=11)
    digest = Digest.of_bytes(data)
    writer = blob_store.open_blob(digest)
    writer.write_many([data[: size // 2], b"", data[size // 2 :]])
    assert writer.close() == size

    with pytest.raises(BlobNotFound):
        blob_store.stat(digest)
    assert list(blob_store.list_digests()) == []
    assert writer.publish() == size

    assert read_all(blob_store, digest) == data
    assert list(blob_store.list_digests()) == [digest]
    writer.cancel()  # after publishing: nothing left to drop, the blob stays
    assert read_all(blob_store, digest) == data
    assert [u for u, _ in blob_store.list_uploads()] == []


@pytest.mark.parametrize("size", [1000, 9 * MiB + 3], ids=["small", "parts"])
def test_a_blob_writer_whose_bytes_do_not_match_publishes_nothing(
    blob_store: BlobStore, size: int
) -> None:
    data = payload(size, seed=12)
    claimed = Digest.of_bytes(b"something else")
    writer = blob_store.open_blob(claimed)
    writer.write(data)

    with pytest.raises(DigestMismatch) as caught:
        writer.publish()  # closes first

    assert (caught.value.expected, caught.value.actual) == (claimed, Digest.of_bytes(data))
    assert caught.value.size == size
    writer.cancel()
    assert list(blob_store.list_digests()) == []
    assert [u for u, _ in blob_store.list_uploads()] == []


@pytest.mark.parametrize("closed", [False, True], ids=["open", "closed"])
def test_a_cancelled_blob_writer_leaves_nothing(blob_store: BlobStore, closed: bool) -> None:
    data = payload(9 * MiB, seed=13)
    writer = blob_store.open_blob(Digest.of_bytes(data))
    writer.write(data)
    if closed:
        writer.close()
    writer.cancel()
    writer.cancel()  # idempotent
    assert list(blob_store.list_digests()) == []
    assert [u for u, _ in blob_store.list_uploads()] == []


def test_a_blob_writer_of_stored_content_keeps_the_blob(blob_store: BlobStore) -> None:
    data = payload(9 * MiB, seed=14)
    digest = store_blob(blob_store, data)
    writer = blob_store.open_blob(digest)
    writer.write(data)
    assert writer.publish() == len(data)
    assert read_all(blob_store, digest) == data
    assert list(blob_store.list_digests()) == [digest]
    impostor = blob_store.open_blob(digest)
    impostor.write(b"impostor")
    with pytest.raises(DigestMismatch):
        impostor.publish()
    assert read_all(blob_store, digest) == data


def test_an_abandoned_blob_write_is_reported_once_and_spared_while_recent(
    blob_store: BlobStore,
) -> None:
    """A writer whose process died before publishing: garbage collection finds it
    either as a session (`list_uploads`) or as a blob write, never both."""
    data = payload(9 * MiB, seed=17)
    writer = blob_store.open_blob(Digest.of_bytes(data))
    writer.write(data)
    writer.close()  # and nothing more: neither published nor cancelled
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    soon = datetime.now(UTC) + timedelta(minutes=5)

    assert blob_store.abort_blob_writes(an_hour_ago) == 0  # begun since: spared
    sessions = [upload_id for upload_id, _ in blob_store.list_uploads()]
    found = blob_store.abort_blob_writes(soon, dry_run=True)
    assert len(sessions) + found == 1
    assert blob_store.abort_blob_writes(soon) == found
    for upload_id in sessions:
        blob_store.abort_upload(upload_id)

    assert blob_store.abort_blob_writes(soon) == 0
    assert list(blob_store.list_uploads()) == []
    assert list(blob_store.list_digests()) == []


def test_range_reads(blob_store: BlobStore) -> None:
    data = payload(3 * MiB + 17, seed=3)
    digest = store_blob(blob_store, data)
    size = len(data)

    assert read_all(blob_store, digest, 5) == data[5:]
    assert read_all(blob_store, digest, 5, 9) == data[5:9]
    assert read_all(blob_store, digest, MiB - 3, 2 * MiB + 3) == data[MiB - 3 : 2 * MiB + 3]
    assert read_all(blob_store, digest, size - 1) == data[-1:]
    assert read_all(blob_store, digest, 0, size) == data
    assert read_all(blob_store, digest, size, size) == b""
    assert read_all(blob_store, digest, size) == b""


def test_a_local_file_is_the_blob_or_none(blob_store: BlobStore) -> None:
    data = b"sent from the file" * 100
    digest = store_blob(blob_store, data)
    local = blob_store.local_file(digest)
    if local is None:  # a store without local files says so for every blob
        assert blob_store.local_file(Digest.of_bytes(b"absent")) is None
        return
    with local:
        assert local.read() == data
    with pytest.raises(BlobNotFound):
        blob_store.local_file(Digest.of_bytes(b"absent"))


def test_read_of_missing_blob_raises_before_iterating(blob_store: BlobStore) -> None:
    missing = Digest.of_bytes(b"never stored")
    with pytest.raises(BlobNotFound):
        blob_store.read(missing)
    with pytest.raises(BlobNotFound):
        blob_store.read(missing, 3, 10)
    with pytest.raises(BlobNotFound):
        blob_store.read(missing, 0, 0)
    with pytest.raises(BlobNotFound):
        blob_store.stat(missing)


@pytest.mark.parametrize("cancelled", [10, 9 * MiB], ids=["buffered", "flushed"])
def test_cancelled_writer_leaves_size_unchanged(blob_store: BlobStore, cancelled: int) -> None:
    upload_id = upload(blob_store, b"kept")
    writer = blob_store.open_writer(upload_id, 4)
    writer.write(payload(cancelled, seed=4))
    writer.cancel()
    assert blob_store.upload_size(upload_id) == 4

    writer = blob_store.open_writer(upload_id, 4)
    writer.write(b" and more")
    assert writer.close() == 13
    digest = Digest.of_bytes(b"kept and more")
    assert blob_store.commit_upload(upload_id, digest) == 13
    assert read_all(blob_store, digest) == b"kept and more"


def test_abort_removes_session_and_is_idempotent(blob_store: BlobStore) -> None:
    upload_id = upload(blob_store, b"abandoned")
    blob_store.abort_upload(upload_id)
    with pytest.raises(UploadNotFound):
        blob_store.upload_size(upload_id)
    with pytest.raises(UploadNotFound):
        blob_store.open_writer(upload_id, 0)
    blob_store.abort_upload(upload_id)
    blob_store.abort_upload(str(uuid.uuid4()))
    blob_store.abort_upload("not-an-upload")
    assert list(blob_store.list_uploads()) == []


def test_uncommitted_upload_is_not_visible(blob_store: BlobStore) -> None:
    data = b"still uploading"
    upload(blob_store, data)
    assert list(blob_store.list_digests()) == []
    with pytest.raises(BlobNotFound):
        blob_store.stat(Digest.of_bytes(data))
    with pytest.raises(BlobNotFound):
        blob_store.read(Digest.of_bytes(data))


def test_list_uploads_shows_open_sessions(blob_store: BlobStore) -> None:
    before = datetime.now().astimezone()
    empty = blob_store.create_upload()
    written = upload(blob_store, b"some", b"bytes")
    committed = upload(blob_store, b"done")
    blob_store.commit_upload(committed, Digest.of_bytes(b"done"))

    uploads = dict(blob_store.list_uploads())

    assert set(uploads) == {empty, written}
    for modified in uploads.values():
        assert modified.tzinfo is not None
        # Store clocks have a one-second resolution on some backends.
        assert (modified - before).total_seconds() > -2


def test_delete(blob_store: BlobStore) -> None:
    kept = store_blob(blob_store, b"kept")
    digest = store_blob(blob_store, b"deleted")
    blob_store.delete(digest)
    with pytest.raises(BlobNotFound):
        blob_store.stat(digest)
    with pytest.raises(BlobNotFound):
        blob_store.read(digest)
    with pytest.raises(BlobNotFound):
        blob_store.delete(digest)
    assert list(blob_store.list_digests()) == [kept]


def test_list_digests_each_once(blob_store: BlobStore) -> None:
    digests = {store_blob(blob_store, f"blob {i}".encode()) for i in range(5)}
    listed = list(blob_store.list_digests())
    assert sorted(listed) == sorted(digests)


def test_ping(blob_store: BlobStore) -> None:
    blob_store.ping()


def test_large_blob_in_uneven_chunks_round_trips(blob_store: BlobStore) -> None:
    data = payload(20 * MiB, seed=5)
    pieces = [data[: 3 * MiB], data[3 * MiB : 14 * MiB], data[14 * MiB :]]
    upload_id = upload(blob_store, *pieces)
    assert blob_store.upload_size(upload_id) == len(data)

    digest = Digest.of_bytes(data)
    assert blob_store.commit_upload(upload_id, digest) == len(data)

    assert blob_store.stat(digest) == len(data)
    assert hashlib.sha256(read_all(blob_store, digest)).hexdigest() == digest.hex
    boundary = 8 * MiB  # a multipart part boundary on S3
    assert (
        read_all(blob_store, digest, boundary - 10, boundary + 10)
        == (data[boundary - 10 : boundary + 10])
    )


@pytest.mark.parametrize(
    "upload_id", ["0b9e4ab2-6f1c-4d7e-9a55-2f3b7c1d8e60", "garbage", "../../blobs", ""], ids=repr
)
def test_unknown_upload_id(blob_store: BlobStore, upload_id: str) -> None:
    with pytest.raises(UploadNotFound):
        blob_store.upload_size(upload_id)
    with pytest.raises(UploadNotFound):
        blob_store.open_writer(upload_id, 0)
    with pytest.raises(UploadNotFound):
        blob_store.commit_upload(upload_id, Digest.of_bytes(b""))


# --- S3 only ---------------------------------------------------------------


@pytest.mark.s3
def test_s3_redirect_url_is_a_working_presigned_get(s3_settings: SettingsFactory) -> None:
    store = open_blob_store(s3_settings(s3_redirect=True, s3_presign_seconds=120))
    data = payload(100_000, seed=6)
    digest = store_blob(store, data)

    url = store.redirect_url(digest)

    assert url is not None
    assert "X-Amz-Expires=120" in url
    response = httpx.get(url)
    assert response.status_code == 200
    assert response.content == data


@pytest.mark.s3
def test_s3_redirect_url_is_none_unless_enabled(s3_settings: SettingsFactory) -> None:
    store = open_blob_store(s3_settings(s3_redirect=False))
    digest = store_blob(store, b"proxied")
    assert store.redirect_url(digest) is None


@pytest.mark.s3
def test_s3_ping_fails_for_missing_bucket(s3_settings: SettingsFactory) -> None:
    store = open_blob_store(s3_settings(s3_bucket=f"peftreg-missing-{uuid.uuid4().hex[:12]}"))
    with pytest.raises(StorageUnavailable):
        store.ping()


@pytest.mark.s3
def test_s3_unreachable_endpoint_is_unavailable(s3_settings: SettingsFactory) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again below: nothing listens there
    store = open_blob_store(s3_settings(s3_endpoint_url=f"http://127.0.0.1:{port}"))
    with pytest.raises(StorageUnavailable):
        store.ping()
    with pytest.raises(StorageUnavailable):
        store.stat(Digest.of_bytes(b"x"))


@pytest.mark.s3
def test_s3_key_layout(s3_settings: SettingsFactory, seaweed: SeaweedS3, s3_bucket: str) -> None:
    store = open_blob_store(s3_settings())
    digest = store_blob(store, b"laid out")
    pending = upload(store, b"pending")

    keys = {
        item["Key"]
        for item in seaweed.client().list_objects_v2(Bucket=s3_bucket).get("Contents", [])
    }

    segment = f"{S3_PREFIX}/uploads/{pending}/{0:020d}-"
    assert {key for key in keys if not key.startswith(segment)} == {
        f"{S3_PREFIX}/blobs/sha256/{digest.hex[:2]}/{digest.hex}",
        f"{S3_PREFIX}/uploads/{pending}/_started",
    }
    assert len([key for key in keys if re.fullmatch(f"{segment}[0-9a-f]{{16}}", key)]) == 1


@pytest.mark.s3
def test_s3_mismatch_leaves_no_multipart_upload(
    s3_settings: SettingsFactory, seaweed: SeaweedS3, s3_bucket: str
) -> None:
    settings = s3_settings()
    writer_store, replica = open_blob_store(settings), open_blob_store(settings)
    data = payload(17 * MiB, seed=7)
    upload_id = upload(writer_store, data)

    with pytest.raises(DigestMismatch):
        replica.commit_upload(upload_id, Digest.of_bytes(b"other"))

    client = seaweed.client()
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert client.list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0


@pytest.mark.s3
def test_s3_stale_chunks_never_join_a_session(
    s3_settings: SettingsFactory, seaweed: SeaweedS3, s3_bucket: str
) -> None:
    """Leftovers of a writer that died mid-cancel are dropped, not committed."""
    store = open_blob_store(s3_settings())
    assert isinstance(store, S3BlobStore)
    upload_id = upload(store, b"head")
    leftover = store.layout.segment(upload_id, 9)
    seaweed.client().put_object(Bucket=s3_bucket, Key=leftover, Body=b"STALE")
    assert store.upload_size(upload_id) == 4

    writer = store.open_writer(upload_id, 4)
    writer.write(b"-tail")  # ends exactly where the leftover starts
    assert writer.close() == 9

    assert store.upload_size(upload_id) == 9
    assert store.commit_upload(upload_id, Digest.of_bytes(b"head-tail")) == 9


@pytest.mark.s3
def test_s3_uncommitted_upload_writes_nothing_under_blobs(
    s3_settings: SettingsFactory, seaweed: SeaweedS3, s3_bucket: str
) -> None:
    store = open_blob_store(s3_settings())
    upload(store, payload(9 * MiB, seed=8), b"more")
    listed = seaweed.client().list_objects_v2(Bucket=s3_bucket, Prefix=f"{S3_PREFIX}/blobs/")
    assert listed.get("KeyCount") == 0


@pytest.mark.s3
def test_s3_a_blob_with_its_digest_goes_to_its_key_without_a_copy(
    s3_settings: SettingsFactory, seaweed: SeaweedS3, s3_bucket: str
) -> None:
    """Parts of a multipart upload at the blob's own key, invisible until published;
    a mismatch or a cancel leaves no unfinished upload behind."""
    store = open_blob_store(s3_settings())
    client = seaweed.client()
    data = payload(17 * MiB, seed=15)
    digest = Digest.of_bytes(data)
    key = f"{S3_PREFIX}/blobs/sha256/{digest.hex[:2]}/{digest.hex}"
    writer = store.open_blob(digest)
    writer.write(data)
    writer.close()
    pending = client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
    assert [upload["Key"] for upload in pending] == [key]
    assert client.list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0

    writer.publish()

    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    listed = client.list_objects_v2(Bucket=s3_bucket)
    assert [item["Key"] for item in listed["Contents"]] == [key]  # no session, no segment
    for claimed in (Digest.of_bytes(b"other"), digest):
        failed = store.open_blob(claimed)
        failed.write(data[: 9 * MiB])
        failed.close()
        if claimed == digest:
            failed.cancel()
        else:
            with pytest.raises(DigestMismatch):
                failed.publish()
        assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert read_all(store, digest) == data


@pytest.mark.s3
def test_s3_blob_parts_grow_so_a_blob_of_unknown_size_fits_the_part_limit(
    seaweed: SeaweedS3, s3_bucket: str
) -> None:
    # 4 parts of 5 MiB hold 20 MiB; growing parts hold more in fewer.
    store = S3BlobStore(seaweed.client(), s3_bucket, part_size=5 * MiB, max_parts=4)
    data = payload(26 * MiB, seed=16)
    digest = Digest.of_bytes(data)
    writer = store.open_blob(digest)
    for start in range(0, len(data), MiB):
        writer.write(data[start : start + MiB])
    assert writer.publish() == len(data)
    assert read_all(store, digest) == data
    head = seaweed.client().head_object(Bucket=s3_bucket, Key=store.layout.blob(digest))
    assert head["ETag"].endswith('-3"')  # parts of 5, 20 and 1 MiB: a multipart ETag


def test_s3_from_settings_requires_a_bucket(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="S3_BUCKET"):
        open_blob_store(Settings(home=tmp_path, storage="s3", s3_bucket=None))


# --- filesystem only -------------------------------------------------------


def test_filesystem_uncommitted_upload_writes_nothing_under_blobs(tmp_path: Path) -> None:
    root = tmp_path / "storage"
    store = open_blob_store(Settings(home=tmp_path, storage="filesystem", storage_path=root))
    upload_id = upload(store, b"partial", b" upload")
    assert [p for p in (root / "blobs").rglob("*") if p.is_file()] == []
    store.abort_upload(upload_id)
    assert list((root / "uploads").iterdir()) == []
