"""The S3 backend's streaming uploads: parts while writing, no re-read at commit.

Runs against SeaweedFS with small part sizes, so several parts, segments and
copy ranges happen with a few MiB. S3 calls are counted with botocore's own
event hooks on the real client.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from peftreg.digest import Digest
from peftreg.registry.storage.errors import BlobNotFound, DigestMismatch, UploadNotFound
from peftreg.registry.storage.s3 import S3BlobStore
from tests.fixtures.seaweed import SeaweedS3
from tests.storage.conftest import S3_PREFIX

pytestmark = pytest.mark.s3

MiB = 1024 * 1024
PART = 5 * MiB  # S3's minimum part, which SeaweedFS enforces too

StoreFactory = Callable[..., S3BlobStore]


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture
def make_store(seaweed: SeaweedS3, s3_bucket: str) -> StoreFactory:
    """A fresh store process on the shared bucket; keyword arguments set its sizes."""

    def make(**sizes: int) -> S3BlobStore:
        return S3BlobStore(seaweed.client(), s3_bucket, S3_PREFIX, part_size=PART, **sizes)

    return make


def count_calls(store: S3BlobStore) -> Counter[str]:
    calls: Counter[str] = Counter()

    def seen(model: Any, **_: Any) -> None:
        calls[model.name] += 1

    store.client.meta.events.register("before-call.s3", seen)
    return calls


def append(store: S3BlobStore, upload_id: str, offset: int, data: bytes, piece: int = MiB) -> int:
    writer = store.open_writer(upload_id, offset)
    for start in range(0, len(data), piece):
        writer.write(data[start : start + piece])
    return writer.close()


def read_all(store: S3BlobStore, digest: Digest) -> bytes:
    return b"".join(store.read(digest))


def leftovers(seaweed: SeaweedS3, bucket: str) -> tuple[list[str], list[str]]:
    """(object keys under uploads/, keys of unfinished multipart uploads)."""
    client = seaweed.client()
    objects = client.list_objects_v2(Bucket=bucket, Prefix=f"{S3_PREFIX}/uploads/")
    multiparts = client.list_multipart_uploads(Bucket=bucket)
    return (
        [item["Key"] for item in objects.get("Contents", [])],
        [upload["Key"] for upload in multiparts.get("Uploads", [])],
    )


def test_patches_stream_as_parts_and_commit_reads_nothing_back(
    make_store: StoreFactory, seaweed: SeaweedS3, s3_bucket: str
) -> None:
    store = make_store()
    calls = count_calls(store)
    # Large PATCHes, a small one in between (taken over by the next), a last short one.
    pieces = [payload(12 * MiB + 3, 1), payload(700_000, 2), payload(11 * MiB, 3), b"end"]
    data = b"".join(pieces)
    upload_id = store.create_upload()
    offset = 0
    for piece in pieces:
        offset = append(store, upload_id, offset, piece)
    assert offset == store.upload_size(upload_id) == len(data)
    assert calls["UploadPart"] >= 4
    # Only the short segment the next PATCH took over was read back (under a part).
    assert calls["GetObject"] == 1

    calls.clear()
    digest = Digest.of_bytes(data)
    assert store.commit_upload(upload_id, digest) == len(data)

    assert calls["GetObject"] == 0  # verified by the running hash, copied server-side
    assert calls["UploadPartCopy"] >= 2
    assert read_all(store, digest) == data
    assert leftovers(seaweed, s3_bucket) == ([], [])


def test_one_writer_rolls_over_into_new_segments(make_store: StoreFactory) -> None:
    store = make_store(max_parts=2, copy_part_size=6 * MiB)
    calls = count_calls(store)
    data = payload(23 * MiB + 11, 4)
    upload_id = store.create_upload()
    assert append(store, upload_id, 0, data, piece=3 * MiB) == len(data)
    segments = [key for key, _, _ in store._list(store.layout.upload(upload_id))]
    assert len(segments) == 4  # the marker and three segments of at most two parts

    calls.clear()
    digest = Digest.of_bytes(data)
    assert store.commit_upload(upload_id, digest) == len(data)
    assert calls["GetObject"] == 0
    assert read_all(store, digest) == data
    assert (
        b"".join(store.read(digest, 10 * MiB - 5, 10 * MiB + 5))
        == data[10 * MiB - 5 : 10 * MiB + 5]
    )


def test_resume_after_restart_rehashes_only_then(make_store: StoreFactory) -> None:
    data = payload(13 * MiB, 5)
    before = make_store()
    upload_id = before.create_upload()
    assert append(before, upload_id, 0, data[: 6 * MiB]) == 6 * MiB

    restarted = make_store()  # a new process: no running hash for the session
    assert restarted.upload_size(upload_id) == 6 * MiB
    assert append(restarted, upload_id, 6 * MiB, data[6 * MiB :]) == len(data)
    calls = count_calls(restarted)
    digest = Digest.of_bytes(data)
    assert restarted.commit_upload(upload_id, digest) == len(data)
    assert calls["GetObject"] == 2  # both segments hashed from the store, once
    assert read_all(restarted, digest) == data

    # The next upload on the restarted process streams as usual.
    again = payload(7 * MiB, 6)
    upload_id = restarted.create_upload()
    append(restarted, upload_id, 0, again)
    calls.clear()
    assert restarted.commit_upload(upload_id, Digest.of_bytes(again)) == len(again)
    assert calls["GetObject"] == 0


def test_small_session_resumed_elsewhere_is_hashed_while_taken_over(
    make_store: StoreFactory,
) -> None:
    """A short first segment is read back by the next writer anyway: it hashes it too."""
    first, second = make_store(), make_store()
    head, rest = b"small head", payload(6 * MiB, 7)
    upload_id = first.create_upload()
    append(first, upload_id, 0, head)
    append(second, upload_id, len(head), rest)
    calls = count_calls(second)
    assert second.commit_upload(upload_id, Digest.of_bytes(head + rest)) == len(head + rest)
    assert calls["GetObject"] == 0
    assert read_all(second, Digest.of_bytes(head + rest)) == head + rest


@pytest.mark.parametrize("committer", ["writer", "restarted"])
def test_digest_mismatch_over_several_segments_leaves_nothing(
    make_store: StoreFactory, seaweed: SeaweedS3, s3_bucket: str, committer: str
) -> None:
    store = make_store(max_parts=1)
    data = payload(16 * MiB, 8)
    upload_id = store.create_upload()
    offset = append(store, upload_id, 0, data[: 9 * MiB])
    append(store, upload_id, offset, data[9 * MiB :])
    claimed = Digest.of_bytes(b"not these bytes")
    committing = store if committer == "writer" else make_store()

    with pytest.raises(DigestMismatch) as caught:
        committing.commit_upload(upload_id, claimed)

    assert caught.value.actual == Digest.of_bytes(data)
    for digest in (claimed, Digest.of_bytes(data)):
        with pytest.raises(BlobNotFound):
            store.stat(digest)
    assert list(store.list_digests()) == []
    assert leftovers(seaweed, s3_bucket) == ([], [])


def test_abort_cleans_parts_of_a_writer_that_never_closed(
    make_store: StoreFactory, seaweed: SeaweedS3, s3_bucket: str
) -> None:
    store = make_store()
    upload_id = store.create_upload()
    append(store, upload_id, 0, payload(6 * MiB, 9))
    crashed = store.open_writer(upload_id, 6 * MiB)
    crashed.write(payload(11 * MiB, 10))  # parts sent; the process dies before close
    _, multiparts = leftovers(seaweed, s3_bucket)
    assert len(multiparts) == 1
    assert store.upload_size(upload_id) == 6 * MiB  # unfinished parts are not part of it

    store.abort_upload(upload_id)

    assert leftovers(seaweed, s3_bucket) == ([], [])
    with pytest.raises(UploadNotFound):
        store.upload_size(upload_id)


def test_cancel_aborts_the_writers_multipart_upload(
    make_store: StoreFactory, seaweed: SeaweedS3, s3_bucket: str
) -> None:
    store = make_store(max_parts=1)
    upload_id = store.create_upload()
    writer = store.open_writer(upload_id, 0)
    writer.write(payload(12 * MiB, 11))  # one complete segment and a multipart under way
    writer.cancel()

    objects, multiparts = leftovers(seaweed, s3_bucket)
    assert multiparts == []
    assert objects == [store.layout.marker(upload_id)]
    assert store.upload_size(upload_id) == 0
