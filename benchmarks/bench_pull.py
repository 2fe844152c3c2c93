"""Cold and cached pull of a 1 GiB artifact via the SDK, against `cp` and `curl`.

Starts a registry on SQLite + filesystem in a temporary directory, pushes a
1 GiB single-file artifact, then times:

- `cp` of the source file (the local-disk floor),
- `curl` of the same blob from the registry (one plain HTTP stream),
- an SDK pull with an empty cache (one stream, verified while written),
- an SDK pull again with the cache warm (target: under 0.2 s).

Run: `.venv/bin/python benchmarks/bench_pull.py [--size-mib 1024]`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_transfer import settle
from peftreg import Client
from tests.fixtures.server import start_registry

MiB = 1024 * 1024


def make_file(path: Path, size: int) -> None:
    block = os.urandom(MiB)
    with path.open("wb") as handle:
        for index in range(size // MiB):
            handle.write(index.to_bytes(8, "big") + block[8:])


def timed(label: str, results: list[tuple[str, float]], action: object) -> None:
    """Time one step after `settle`: no earlier writeback, no memory the host took back."""
    settle()
    started = time.perf_counter()
    action()  # type: ignore[operator]
    results.append((label, time.perf_counter() - started))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    args = parser.parse_args()
    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory(prefix="peftreg-bench-") as tmp:
        root = Path(tmp)
        server = start_registry(root / "home")
        try:
            (root / "src").mkdir()
            make_file(root / "src" / "model.bin", size)
            with Client(server.url, cache=root / "cache") as client:
                pushed = client.push(root / "src", "bench/model:v1")
            blob = pushed.files[0].digest
            results: list[tuple[str, float]] = []
            timed(
                "cp (local disk)",
                results,
                lambda: shutil.copyfile(root / "src" / "model.bin", root / "cp.bin"),
            )

            def durable_copy() -> None:
                shutil.copyfile(root / "src" / "model.bin", root / "cp2.bin")
                with (root / "cp2.bin").open("rb") as handle:
                    os.fsync(handle.fileno())

            timed("cp + fsync (durable)", results, durable_copy)
            if shutil.which("curl"):
                url = f"{server.url}/v2/bench/model/blobs/{blob}"
                timed(
                    "curl (one stream, unverified)",
                    results,
                    lambda: subprocess.run(
                        ["curl", "-sf", "-o", str(root / "curl.bin"), url], check=True
                    ),
                )
            with Client(server.url, cache=root / "cache") as client:
                timed(
                    "SDK pull, cold cache (verified)",
                    results,
                    lambda: client.pull("bench/model:v1", root / "out1"),
                )
                timed(
                    "SDK pull, warm cache",
                    results,
                    lambda: client.pull("bench/model:v1", root / "out2"),
                )
        finally:
            server.stop()
    print(f"pull of a {args.size_mib} MiB artifact")
    for label, seconds in results:
        rate = size / MiB / seconds
        print(f"  {label:34s} {seconds:8.3f} s  {rate:9.0f} MiB/s")
    seconds = dict(results)
    cold = seconds["SDK pull, cold cache (verified)"]
    print(
        f"  cold pull / cp = {cold / seconds['cp (local disk)']:.2f}, "
        f"/ cp + fsync = {cold / seconds['cp + fsync (durable)']:.2f}"
        + (
            f", / curl = {cold / seconds['curl (one stream, unverified)']:.2f}"
            if "curl (one stream, unverified)" in seconds
            else ""
        )
        + "  [target <= 1.5 x cp]"
    )
    cached = results[-1][1]
    print(f"  warm-cache target < 0.2 s: {'met' if cached < 0.2 else 'MISSED'}")


if __name__ == "__main__":
    main()
