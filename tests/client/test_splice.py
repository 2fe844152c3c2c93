"""`peftreg.splice.socket_to_file`: a socket's bytes into a file in the kernel (socket pairs)."""

from __future__ import annotations

import os
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from peftreg.splice import LANDED_EVERY, can_splice, socket_to_file

MiB = 1024 * 1024


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    sender, receiver = socket.socketpair()
    receiver.settimeout(30)  # non-blocking underneath, as http.client's and asyncio's are
    with sender, receiver:
        yield sender, receiver


def _send_in_thread(sender: socket.socket, data: bytes, close: bool) -> threading.Thread:
    def send() -> None:
        sender.sendall(data)
        if close:
            sender.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def test_the_bytes_land_in_order_after_what_the_file_held(
    pair: tuple[socket.socket, socket.socket], tmp_path: Path
) -> None:
    sender, receiver = pair
    assert can_splice(receiver)
    data = os.urandom(9 * MiB + 17)
    target = tmp_path / "blob"
    target.write_bytes(b"prefix")
    landed: list[int] = []
    thread = _send_in_thread(sender, data + b"next request", close=False)
    fd = os.open(target, os.O_WRONLY)
    try:
        os.lseek(fd, 6, os.SEEK_SET)
        moved = socket_to_file(receiver.fileno(), fd, len(data), landed.append, timeout=30)
    finally:
        os.close(fd)
    thread.join()
    assert moved == len(data) == sum(landed)
    assert target.read_bytes() == b"prefix" + data
    assert all(piece >= LANDED_EVERY for piece in landed[:-1])
    # Not a byte past the count: the next request is still in the socket.
    assert receiver.recv(64) == b"next request"


def test_a_stream_that_ends_early_returns_what_landed(
    pair: tuple[socket.socket, socket.socket], tmp_path: Path
) -> None:
    sender, receiver = pair
    data = os.urandom(3 * MiB)
    landed: list[int] = []
    thread = _send_in_thread(sender, data, close=True)
    fd = os.open(tmp_path / "blob", os.O_WRONLY | os.O_CREAT)
    try:
        moved = socket_to_file(receiver.fileno(), fd, 5 * MiB, landed.append, timeout=30)
    finally:
        os.close(fd)
    thread.join()
    assert moved == len(data) == sum(landed)
    assert (tmp_path / "blob").read_bytes() == data


def test_silence_past_the_timeout_raises_with_what_landed_reported(
    pair: tuple[socket.socket, socket.socket], tmp_path: Path
) -> None:
    sender, receiver = pair
    sender.sendall(b"x" * 1000)
    landed: list[int] = []
    fd = os.open(tmp_path / "blob", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(ConnectionError, match=r"no data for 0\.2 s after 1000 of 5000"):
            socket_to_file(receiver.fileno(), fd, 5000, landed.append, timeout=0.2)
    finally:
        os.close(fd)
    assert landed == [1000]
    assert (tmp_path / "blob").read_bytes() == b"x" * 1000


def test_a_set_stop_ends_it(pair: tuple[socket.socket, socket.socket], tmp_path: Path) -> None:
    _sender, receiver = pair
    stop = threading.Event()
    stop.set()
    fd = os.open(tmp_path / "blob", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(ConnectionAbortedError, match="stopped after 0 of 10"):
            socket_to_file(receiver.fileno(), fd, 10, lambda _n: None, timeout=None, stop=stop)
    finally:
        os.close(fd)


def test_tls_sockets_are_not_spliced() -> None:
    context = ssl.create_default_context()
    with socket.socket() as plain:
        wrapped = context.wrap_socket(
            plain, server_hostname="registry", do_handshake_on_connect=False
        )
        assert not can_splice(wrapped)
    assert not can_splice(object())
