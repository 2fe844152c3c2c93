"""Transfer benchmark: push and pull of one large blob against `cp` on the same disk.

Run with `make bench` (or `.venv/bin/python benchmarks/bench_transfer.py`).
`BENCH_SIZE_MB` sets the blob size (default 1024). Everything lives in one
temporary directory, so the file, its copies and the registry's storage are
on the same disk.

What is timed:

- `cp` of the file to a new path, twice. `cp` does not fsync: its bytes may
  still sit in the page cache when it exits. The registry fsyncs every upload
  before it acknowledges it, so it does strictly more work. Every step starts
  after `sync`, so none pays for the writeback of an earlier one.
- `cp` followed by an fsync of the copy: the like-for-like comparison, since
  the registry makes every upload durable before answering 201. Printed
  for information; the push/cp and pull/cp ratios use the plain copies.
- push, two ways, each against a fresh registry: (1) `POST ?digest=` with
  the whole blob streamed in 8 MiB chunks (the client must hash the file
  first, which is included); (2) `POST` + one streamed `PATCH` + `PUT
  ?digest=`, hashing while streaming. The table's "push" row is the faster.
- pull: `GET` streamed into a file, hashed on the way and verified. The
  client reads with `iter_raw()` (no re-chunking; see `pull`).
- re-push of the same content: `HEAD` finds the blob, so no blob byte is sent.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

CHUNK = 8 * 1024 * 1024
MiB = 1024 * 1024
REPO = "bench/transfer"
REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A `peftreg serve` on the filesystem backend under `home`."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PEFTREG_")}
        env.update({"PEFTREG_HOME": str(home), "PEFTREG_PORT": str(self.port)})
        home.mkdir(parents=True)
        self.log = (home / "server.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "peftreg.cli.main", "serve", "--log-level", "warning"],
            env=env,
            cwd=REPO_ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"peftreg serve exited; see {home / 'server.log'}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("peftreg serve did not become ready in 30 s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def make_file(path: Path, size: int) -> str:
    hasher = hashlib.sha256()
    with path.open("wb") as handle:
        remaining = size
        while remaining:
            block = os.urandom(min(CHUNK, remaining))
            hasher.update(block)
            handle.write(block)
            remaining -= len(block)
    return f"sha256:{hasher.hexdigest()}"


def timed(work: Callable[[], object]) -> tuple[float, object]:
    """Time `work` from a clean page cache state: dirty pages left by an earlier
    step are flushed first, so no step pays for another's writeback."""
    os.sync()
    start = time.perf_counter()
    result = work()
    return time.perf_counter() - start, result


def file_chunks(
    path: Path, counter: list[int], hasher: hashlib._Hash | None = None
) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            counter[0] += len(chunk)
            if hasher is not None:
                hasher.update(chunk)
            yield chunk


def hash_file(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            hasher.update(chunk)
    return f"sha256:{hasher.hexdigest()}"


def push_monolithic(client: httpx.Client, path: Path, counter: list[int]) -> str:
    digest = hash_file(path)  # a client must know the digest before it POSTs
    response = client.post(
        f"/v2/{REPO}/blobs/uploads/",
        params={"digest": digest},
        content=file_chunks(path, counter),
        headers={"Content-Type": "application/octet-stream"},
    )
    if response.status_code != 201:
        raise RuntimeError(f"monolithic push failed: {response.status_code} {response.text}")
    return digest


def push_patch_put(client: httpx.Client, path: Path, counter: list[int]) -> str:
    started = client.post(f"/v2/{REPO}/blobs/uploads/")
    started.raise_for_status()
    hasher = hashlib.sha256()
    patched = client.patch(
        started.headers["Location"],
        content=file_chunks(path, counter, hasher),
        headers={"Content-Type": "application/octet-stream"},
    )
    patched.raise_for_status()
    digest = f"sha256:{hasher.hexdigest()}"
    finished = client.put(patched.headers["Location"], params={"digest": digest})
    if finished.status_code != 201:
        raise RuntimeError(f"PATCH+PUT push failed: {finished.status_code} {finished.text}")
    return digest


def pull(client: httpx.Client, digest: str, target: Path) -> str:
    hasher = hashlib.sha256()
    with (
        client.stream("GET", f"/v2/{REPO}/blobs/{digest}") as response,
        target.open("wb") as handle,
    ):
        response.raise_for_status()
        # iter_raw() as the transport delivers: iter_raw(CHUNK) re-chunks by
        # concatenating bytes, which alone costs ~1.5 s per GiB on the client.
        for chunk in response.iter_raw():
            hasher.update(chunk)
            handle.write(chunk)
    return f"sha256:{hasher.hexdigest()}"


def repush(client: httpx.Client, path: Path, digest: str, counter: list[int]) -> None:
    """What a client does for a blob it may not need to send: HEAD first."""
    if client.head(f"/v2/{REPO}/blobs/{digest}").status_code == 200:
        return
    push_patch_put(client, path, counter)


def main() -> int:
    size_mb = int(os.environ.get("BENCH_SIZE_MB", "1024"))
    size = size_mb * MiB
    with tempfile.TemporaryDirectory(prefix="peftreg-bench-") as tmp:
        root = Path(tmp)
        source = root / "blob.bin"
        print(f"creating {size_mb} MiB of random data in {root} ...", flush=True)
        digest = make_file(source, size)

        cp_cold, _ = timed(lambda: subprocess.run(["cp", source, root / "copy1"], check=True))
        cp_warm, _ = timed(lambda: subprocess.run(["cp", source, root / "copy2"], check=True))

        def durable_copy() -> None:
            subprocess.run(["cp", source, root / "copy3"], check=True)
            with (root / "copy3").open("rb") as handle:
                os.fsync(handle.fileno())

        cp_durable, _ = timed(durable_copy)
        for name in ("copy1", "copy2", "copy3"):
            (root / name).unlink()

        pushes: dict[str, float] = {}
        pull_seconds = 0.0
        repush_bytes = -1
        for label, push in (("POST ?digest=", push_monolithic), ("PATCH+PUT", push_patch_put)):
            server = Server(root / f"home-{len(pushes)}")
            try:
                with httpx.Client(base_url=server.url, timeout=600) as client:
                    sent = [0]
                    seconds, pushed = timed(lambda: push(client, source, sent))  # noqa: B023
                    if pushed != digest or sent[0] != size:
                        raise RuntimeError(f"{label}: pushed {pushed} ({sent[0]} bytes)")
                    pushes[label] = seconds
                    if label == "PATCH+PUT":
                        target = root / "pulled.bin"
                        pull_seconds, pulled = timed(lambda t=target: pull(client, digest, t))
                        if pulled != digest or target.stat().st_size != size:
                            raise RuntimeError(f"pull returned {pulled}")
                        target.unlink()
                        counter = [0]
                        repush(client, source, digest, counter)
                        repush_bytes = counter[0]
            finally:
                server.stop()
                shutil.rmtree(server.home, ignore_errors=True)

        best = min(pushes, key=lambda key: pushes[key])
        rows = [
            ("cp (run 1)", cp_cold),
            ("cp (run 2)", cp_warm),
            ("cp + fsync (durable)", cp_durable),
            *((f"push {label}", seconds) for label, seconds in pushes.items()),
            ("pull GET", pull_seconds),
        ]
        print(
            f"\n{size_mb} MiB blob; ratios against cp run 1 ({cp_cold:.2f} s), "
            f"cp run 2 ({cp_warm:.2f} s) and cp + fsync ({cp_durable:.2f} s)\n"
        )
        print(
            f"{'operation':<24}{'seconds':>10}{'MB/s':>10}{'/cp1':>8}{'/cp2':>8}{'/cp+fsync':>11}"
        )
        for name, seconds in rows:
            rate = size / MiB / seconds if seconds else float("inf")
            print(
                f"{name:<24}{seconds:>10.2f}{rate:>10.0f}"
                f"{seconds / cp_cold:>8.2f}{seconds / cp_warm:>8.2f}{seconds / cp_durable:>11.2f}"
            )
        best_push = pushes[best]
        cp_best = min(cp_cold, cp_warm)
        print(
            f"\npush/cp  = {best_push / cp_best:.2f} (faster cp), "
            f"{best_push / cp_durable:.2f} (cp + fsync)  [best push: {best}; target <= 2]"
        )
        print(
            f"pull/cp  = {pull_seconds / cp_best:.2f} (faster cp), "
            f"{pull_seconds / cp_durable:.2f} (cp + fsync)  [target <= 1.5]"
        )
        print(f"re-push blob bytes sent: {repush_bytes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
