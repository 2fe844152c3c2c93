"""`FollowingHash`: the hash of every piece, in order, never too far behind the writer."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from peftreg.following_hash import FollowingHash


def test_the_hash_is_of_every_piece_in_order() -> None:
    pieces = [os.urandom(n) for n in (0, 1, 4096, 100_000, 7)]
    following = FollowingHash(hashlib.sha256(), depth=2)
    following.update(pieces[0])
    following.update_many(pieces[1:3])
    following.update(memoryview(pieces[3]), pieces[4])
    assert following.finish().hexdigest() == hashlib.sha256(b"".join(pieces)).hexdigest()
    assert following.finish().hexdigest() == hashlib.sha256(b"".join(pieces)).hexdigest()


class _Recording:
    """A hash state that records how far the writer was ahead at each update."""

    def __init__(self, written: list[int]) -> None:
        self.written = written
        self.lags: list[int] = []
        self.hashed = 0

    def update(self, piece: bytes) -> None:
        self.lags.append(len(self.written) - self.hashed)
        self.hashed += 1


def test_the_writer_is_held_back_at_depth_pieces() -> None:
    depth = 3
    written: list[int] = []
    state = _Recording(written)
    following = FollowingHash(state, depth=depth)  # type: ignore[arg-type]

    def write() -> None:
        for index in range(200):
            following.update(b"x")
            written.append(index)

    writer = threading.Thread(target=write)
    writer.start()
    writer.join()
    following.finish()
    assert state.hashed == 200
    # Pieces handed over but not hashed: those queued plus the one being taken.
    assert max(state.lags) <= depth + 1


def test_file_ranges_are_read_back_in_order_with_the_pieces(tmp_path: Path) -> None:
    """How a spliced download or upload hashes: bytes the kernel wrote, read from the file."""
    head, spliced, tail = os.urandom(1000), os.urandom(3 * 1024 * 1024 + 5), os.urandom(9)
    path = tmp_path / "landed"
    path.write_bytes(b"earlier" + spliced)
    fd = os.open(path, os.O_RDONLY)
    try:
        following = FollowingHash(hashlib.sha256(), depth=2)
        following.update(head)
        following.update_file(fd, 7, 7 + 2 * 1024 * 1024)
        following.update_file(fd, 7 + 2 * 1024 * 1024, 7 + len(spliced))
        following.drain()  # every range read: the file may close now
    finally:
        os.close(fd)
    following.update(tail)
    assert following.finish().hexdigest() == hashlib.sha256(head + spliced + tail).hexdigest()


def test_a_range_that_cannot_be_read_back_fails_the_finish(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "gone", os.O_WRONLY | os.O_CREAT)  # not readable
    following = FollowingHash(hashlib.sha256(), depth=2)
    following.update_file(fd, 0, 10)
    following.drain()
    os.close(fd)
    following.update(b"after")  # still taken, not hashed
    with pytest.raises(OSError):
        following.finish()
