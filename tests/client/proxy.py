"""A TCP proxy in front of a real registry: counts bytes and can cut the line.

`cut_after` makes the proxy close every connection once that many bytes went
from the server to the client, and refuse new ones until `reset()`: a
network failure in the middle of a download, for real sockets.
`cut_upstream_after` closes the connections once, when that many bytes went
from the client to the server, and lets new ones through: a dropped line in
the middle of an upload that the client may retry.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

_RANGE_RE = re.compile(rb"(?im)^range:\s*(bytes=[0-9-]+)")
_REQUEST_RE = re.compile(rb"(?m)^(GET|HEAD|POST|PATCH|PUT|DELETE) (\S+) HTTP/1\.1\r$")


class CuttingProxy:
    def __init__(
        self,
        target_port: int,
        cut_after: int | None = None,
        cut_upstream_after: int | None = None,
    ) -> None:
        self.target_port = target_port
        self.cut_after = cut_after
        self.cut_upstream_after = cut_upstream_after
        self.downstream = 0
        self.upstream = 0
        self.ranges: list[str] = []
        self.requests: list[str] = []
        self.dead = False
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self, cut_after: int | None = None) -> None:
        with self._lock:
            self.cut_after = cut_after
            self.downstream = 0
            self.ranges = []
            self.dead = False

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self._kill_all()

    def _kill_all(self) -> None:
        with self._lock:
            sockets = list(self._sockets)
            self._sockets.clear()
        for sock in sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _addr = self._listener.accept()
            except OSError:
                return
            if self.dead:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets.update((client, upstream))
            threading.Thread(target=self._up, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client), daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            while data := client.recv(256 * 1024):
                cut = False
                with self._lock:
                    self.ranges += [m.decode() for m in _RANGE_RE.findall(data)]
                    self.requests += [
                        f"{m[0].decode()} {m[1].decode()}" for m in _REQUEST_RE.findall(data)
                    ]
                    if self.cut_upstream_after is not None:
                        allowed = max(0, self.cut_upstream_after - self.upstream)
                        if allowed < len(data):
                            data, cut = data[:allowed], True
                            self.cut_upstream_after = None  # once
                    self.upstream += len(data)
                if data:
                    upstream.sendall(data)
                if cut:
                    self._kill_all()
                    break
        except OSError:
            pass
        finally:
            self._close_pair(client, upstream)

    def _down(self, upstream: socket.socket, client: socket.socket) -> None:
        try:
            while data := upstream.recv(256 * 1024):
                with self._lock:
                    if self.dead:
                        break
                    if self.cut_after is not None:
                        allowed = max(0, self.cut_after - self.downstream)
                        if allowed < len(data):
                            data = data[:allowed]
                            self.dead = True
                    self.downstream += len(data)
                if data:
                    client.sendall(data)
                if self.dead:
                    self._kill_all()
                    break
        except OSError:
            pass
        finally:
            self._close_pair(client, upstream)

    def _close_pair(self, *sockets: socket.socket) -> None:
        for sock in sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            with self._lock:
                self._sockets.discard(sock)


@contextmanager
def cutting_proxy(
    target_port: int, cut_after: int | None = None, cut_upstream_after: int | None = None
) -> Iterator[CuttingProxy]:
    proxy = CuttingProxy(target_port, cut_after, cut_upstream_after)
    try:
        yield proxy
    finally:
        proxy.close()
