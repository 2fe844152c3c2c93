"""Blob bodies moved between file and socket by the kernel (`sendfile`, `splice`).

uvicorn implements neither ASGI's `zerocopysend` nor its `pathsend`
extension, so a body the app sends goes through Python: read from the file
into memory, then written to the socket. `peftreg serve` runs uvicorn with
`SendfileHttpToolsProtocol`, uvicorn's httptools protocol plus one ASGI
extension, `peftreg.sendfile` (`peftreg.registry.api.sendfile`), offered on
plain (not TLS) connections. When the app sends that message, the headers
are on the wire, and a worker thread calls `os.sendfile` on duplicates of
the connection's and the file's descriptors until `count` bytes are sent,
waiting with `poll` while the socket is full. The thread owns and closes the
duplicates, so if the connection or the file is closed meanwhile, no number
it uses can come to name another connection or file. Where the headers still
sit in the transport's buffer, the body is sent the ordinary way (read by a thread); a
connection that breaks is closed. The blob GET of the filesystem store uses
it (`peftreg.registry.api.routes.oci_blobs`).

The other way, `peftreg.receive_into` (`peftreg.registry.api.receive_into`)
is offered for a request body of one Content-Length: the protocol stops
reading the transport, and a worker thread writes what the parser already
buffered, then splices the rest from the socket into the app's file
(`peftreg.splice`). The parser never sees those bytes, so once they are in,
the connection gets a fresh parser for its next request, as a new
connection would. A body that ends early closes the connection. Uploads on
the filesystem store use it (`peftreg.registry.api.routes.oci_uploads`).

On every connection, TLS or not, `peftreg.draining`
(`peftreg.registry.api.draining`) tells a request in flight that the
server's graceful shutdown has begun (uvicorn calls the protocol's
`shutdown`), so a long poll answers rather than hold the shutdown.

This reaches into uvicorn's `RequestResponseCycle` (its `send`, its
Content-Length accounting, its body buffer and events) and the protocol's
parser and flow control, whose version the lock pins;
`tests/integration/test_zero_copy.py` runs it in a real server.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import select
import threading
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from peftreg import splice
from peftreg.registry.api.draining import DRAINING
from peftreg.registry.api.receive_into import RECEIVE_INTO
from peftreg.registry.api.sendfile import SENDFILE

READ_CHUNK = 4 * 1024 * 1024  # the fallback's pieces
STALL_SECONDS = 300  # a client that reads (or sends) nothing for this long is dropped
# Threads for bodies in flight, sent or received (each mostly waits in `poll` on a slow
# client), per process; more wait their turn:
# not asyncio's default executor, whose few threads other work shares.
TRANSFERS = 64
Send = Callable[[Any], Awaitable[None]]


@functools.cache
def _executor() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(TRANSFERS, thread_name_prefix="peftreg-zero-copy")


def _send_all(
    socket_fd: int, file_fd: int, offset: int, count: int, abort: threading.Event
) -> None:
    """`count` bytes of the file from `offset` to a non-blocking socket.

    Owns both descriptors (duplicates, closed here), so whatever happens to the
    request meanwhile, no number it uses can come to name another file or
    connection. Stops within a second of `abort` being set.
    """
    try:
        poller = select.poll()
        poller.register(socket_fd, select.POLLOUT)
        end = offset + count
        idle = 0
        while offset < end:
            if abort.is_set():
                raise ConnectionAbortedError("the request was cancelled")
            try:
                sent = os.sendfile(socket_fd, file_fd, offset, end - offset)
            except BlockingIOError:
                idle = 0 if poller.poll(1000) else idle + 1
                if idle >= STALL_SECONDS:
                    raise TimeoutError(f"the client read nothing for {STALL_SECONDS} s") from None
                continue
            if sent == 0:
                raise EOFError(f"the file ended {end - offset} bytes early")
            offset += sent
    finally:
        os.close(socket_fd)
        os.close(file_fd)


class _SendfileCycle:
    """The `send` of one request's cycle, taught the `peftreg.sendfile` message."""

    def __init__(self, cycle: RequestResponseCycle) -> None:
        self.cycle = cycle
        self.send_ordinary: Send = cycle.send

    async def send(self, message: Any) -> None:
        if message["type"] != SENDFILE:
            await self.send_ordinary(message)
            return
        cycle = self.cycle
        count = int(message["count"])
        if cycle.disconnected:
            return
        if (
            not cycle.response_started
            or cycle.response_complete
            or cycle.chunked_encoding
            or cycle.scope["method"] == "HEAD"
            or cycle.expected_content_length != count
        ):
            raise RuntimeError(f"{SENDFILE} needs a started response of Content-Length {count}")
        transport = cycle.transport
        socket = transport.get_extra_info("socket")
        if socket is None or transport.get_write_buffer_size():
            await self._send_read(message["file"], int(message["offset"]), count)
            return
        abort = threading.Event()
        duplicates = [os.dup(socket.fileno())]
        try:
            duplicates.append(os.dup(message["file"].fileno()))
            socket_copy, file_copy = duplicates
            offset = int(message["offset"])
            sending = _executor().submit(_send_all, socket_copy, file_copy, offset, count, abort)
        except BaseException:
            for descriptor in duplicates:  # the thread never took them
                os.close(descriptor)
            raise
        try:
            await asyncio.wrap_future(sending)
        except (OSError, TimeoutError, EOFError):
            cycle.disconnected = True  # the connection cannot carry another response
            transport.close()
            return
        except asyncio.CancelledError:
            abort.set()
            raise
        cycle.expected_content_length = 0  # sent past the cycle's own accounting
        await self.send_ordinary({"type": "http.response.body", "body": b"", "more_body": False})

    async def _send_read(self, file: BinaryIO, offset: int, count: int) -> None:
        """The ordinary way: pieces read on a worker thread, sent as body messages."""
        loop = asyncio.get_running_loop()
        end = offset + count
        while offset < end:
            size = min(READ_CHUNK, end - offset)
            piece = await loop.run_in_executor(_executor(), os.pread, file.fileno(), size, offset)
            if not piece:
                raise EOFError(f"the file ended {end - offset} bytes early")
            offset += len(piece)
            await self.send_ordinary(
                {"type": "http.response.body", "body": piece, "more_body": offset < end}
            )


def _receive_all(
    socket_fd: int,
    file_fd: int,
    head: bytes,
    count: int,
    landed: Callable[[int], None],
    abort: threading.Event,
) -> int:
    """`head`, then `count` bytes spliced from the socket, into the file; the bytes spliced.

    Owns both descriptors (duplicates, closed here), as `_send_all` does.
    """
    try:
        view = memoryview(head)
        while view:
            view = view[os.write(file_fd, view) :]
        if head:
            landed(len(head))
        return splice.socket_to_file(
            socket_fd, file_fd, count, landed, timeout=STALL_SECONDS, stop=abort
        )
    finally:
        os.close(socket_fd)
        os.close(file_fd)


class SendfileHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools HTTP/1.1 protocol with the `peftreg.sendfile`,
    `peftreg.receive_into` and `peftreg.draining` extensions."""

    _body_seen = 0  # body bytes the parser has handed to the current cycle
    _draining: asyncio.Event | None = None  # the connection's `peftreg.draining` event

    def shutdown(self) -> None:
        """The server's graceful shutdown has begun: a request in flight that waits on
        `peftreg.draining` answers now (a long poll would hold the shutdown)."""
        if self._draining is not None:
            self._draining.set()
        super().shutdown()

    def on_headers_complete(self) -> None:
        before = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        # A new cycle whose task has not run yet (it starts on the next loop turn).
        if cycle is None or cycle is before:
            return
        extensions = self.scope.setdefault("extensions", {})
        if self._draining is None:
            self._draining = asyncio.Event()
        extensions[DRAINING] = {"event": self._draining}
        if self.transport.get_extra_info("sslcontext"):
            return
        self._body_seen = 0
        extensions[SENDFILE] = {}
        length = _content_length(self.scope["headers"])
        if length is not None and splice.AVAILABLE:
            extensions[RECEIVE_INTO] = {
                "receive_into": functools.partial(self._receive_into, cycle, length)
            }
        cycle.send = _SendfileCycle(cycle).send  # type: ignore[method-assign]

    def on_body(self, body: bytes) -> None:
        self._body_seen += len(body)
        super().on_body(body)

    async def _receive_into(
        self,
        cycle: RequestResponseCycle,
        length: int,
        fd: int,
        landed: Callable[[int], None],
    ) -> bool:
        """The extension (`peftreg.registry.api.receive_into`) for one request's cycle."""
        if cycle.disconnected or cycle.response_complete:
            return False
        socket = self.transport.get_extra_info("socket")
        if socket is None:
            raise RuntimeError(f"{RECEIVE_INTO} needs the connection's socket")
        if cycle.waiting_for_100_continue and not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            cycle.waiting_for_100_continue = False
        # No more `data_received` from here: the rest of the body stays in the socket.
        self.flow.pause_reading()
        head, cycle.body = bytes(cycle.body), bytearray()
        remaining = length - self._body_seen if cycle.more_body else 0
        abort = threading.Event()
        duplicates = [os.dup(socket.fileno())]
        try:
            duplicates.append(os.dup(fd))
            socket_copy, file_copy = duplicates
            receiving = _executor().submit(
                _receive_all, socket_copy, file_copy, head, remaining, landed, abort
            )
        except BaseException:
            for descriptor in duplicates:  # the thread never took them
                os.close(descriptor)
            raise
        try:
            spliced = await asyncio.wrap_future(receiving)
        except ConnectionError:
            spliced = -1
        except asyncio.CancelledError:
            abort.set()  # the thread stops within a second; wait, it may still write
            with contextlib.suppress(BaseException):
                await asyncio.wrap_future(receiving)
            self.transport.close()
            raise
        except BaseException:
            # The file failed: the app answers, then the connection closes (the rest of
            # the body is still unread, so no next request can follow on it).
            cycle.keep_alive = False
            raise
        if spliced != remaining:  # broken, or ended early: the connection is done
            cycle.disconnected = True
            cycle.message_event.set()
            self.transport.close()
            return False
        if remaining:
            # The parser never saw the spliced bytes: the next request starts a fresh one.
            self.parser = httptools.HttpRequestParser(self)
            with contextlib.suppress(AttributeError):  # as uvicorn sets up its own
                self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
            self._body_seen = length
        cycle.more_body = False
        cycle.message_event.set()
        self.flow.resume_reading()
        return True


def _content_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    """A request's body length where one Content-Length gives it (not chunked), else None."""
    headers = list(headers)
    lengths = [value for name, value in headers if name == b"content-length"]
    chunked = any(name == b"transfer-encoding" for name, _value in headers)
    if len(lengths) != 1 or chunked or not lengths[0].strip().isdigit():
        return None
    return int(lengths[0])
