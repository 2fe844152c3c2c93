"""`FollowingHash`: the hash of every piece, in order, never too far behind the writer."""

from __future__ import annotations

import hashlib
import os
import threading

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
