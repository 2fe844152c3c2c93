"""Metadata benchmark: peftreg's reads against MLflow's model registry, in one run.

Run with `make bench-api` (or `.venv/bin/python benchmarks/bench_api.py`).
For each database (SQLite; PostgreSQL at `PEFTREG_TEST_POSTGRES_URL`) and
each repository size (1,000 and 10,000 versions), both registries get the
same versions and `wrk` (Debian package `wrk`) sends 32 connections of
random requests for `BENCH_API_SECONDS` (default 10) per endpoint:

| peftreg | MLflow |
|---|---|
| manifest GET by tag (`/v2/<repo>/manifests/<tag>`) | get-model-version |
| version detail (`/api/v1/repositories/<repo>/versions/<digest>`) | get-model-version |
| version listing: 100 at a random cursor | search-model-versions: 100 at a random page token |

peftreg runs as `peftreg serve --workers N` (`BENCH_API_WORKERS`, default
the number of cores: the documented setting); MLflow as `mlflow server
--workers 4` (its default). MLflow is installed into its own virtual
environment (`BENCH_MLFLOW_VENV`, default `~/.cache/peftreg-bench/mlflow`),
created here on first use from its own hashed lock (`benchmarks/mlflow-lock.txt`,
MLflow 3.17.2), never from the project's.

Versions are written straight into each registry's database (peftreg: rows
as a push writes them; MLflow: through its own client on the store), so
filling 10,000 takes seconds for peftreg; MLflow's client takes longer.
Sizes and backends: `BENCH_API_VERSIONS=1000,10000`, `BENCH_API_BACKENDS=
sqlite,postgresql`. The plans of the statements a listing page, a version
detail and a manifest by tag send are printed at the largest size (EXPLAIN).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_transfer import clean_env, free_port, stop, wait_http

REPO = "bench/model"
MODEL = "bench-model"
EMPTY_CONFIG_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
PEFTREG = [sys.executable, "-m", "peftreg.cli.main"]
CONNECTIONS = 32
MLFLOW_WORKERS = 4
WRK_SCRIPT = """
local paths = {}
for line in io.lines(os.getenv("BENCH_PATHS")) do paths[#paths + 1] = line end
math.randomseed(os.time() + math.floor(os.clock() * 1000000))
request = function()
  return wrk.format("GET", paths[math.random(#paths)])
end
"""


@dataclass
class Load:
    requests_per_second: float
    p99_ms: float
    errors: int


def warm_up(url: str, paths: list[str]) -> None:
    """Until every worker process has answered: MLflow's first request imports for seconds."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    deadline = time.monotonic() + 300

    def get(path: str) -> None:
        # MLflow resets connections while its workers start: retried here, never counted.
        while True:
            try:
                httpx.get(url + path, timeout=300).raise_for_status()
                return
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise

    with ThreadPoolExecutor(CONNECTIONS) as pool:
        list(pool.map(get, (paths * CONNECTIONS)[: CONNECTIONS * 4]))


def wrk(url: str, paths: list[str], seconds: int, workdir: Path) -> Load:
    warm_up(url, paths)
    listing = workdir / "paths.txt"
    listing.write_text("\n".join(paths) + "\n")
    script = workdir / "random.lua"
    script.write_text(WRK_SCRIPT)
    threads = str(max(1, min(4, os.cpu_count() or 1)))
    done = subprocess.run(
        [
            "wrk",
            "-t",
            threads,
            "-c",
            str(CONNECTIONS),
            "-d",
            f"{seconds}s",
            "--latency",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url,
        ],
        env={**os.environ, "BENCH_PATHS": str(listing)},
        capture_output=True,
        text=True,
        check=True,
    )
    out = done.stdout
    if re.search(r"(?m)^\s*0 requests in", out):
        print(f"    wrk completed no request (each took longer than the run?):\n{out}")
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    p99_ms = float(p99.group(1)) * scale[p99.group(2)] if p99 else float("nan")
    errors = 0
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if non_2xx:
        errors += int(non_2xx.group(1))
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    if sockets:
        errors += sum(int(value) for value in sockets.groups())
    return Load(rate, p99_ms, errors)


# peftreg ---------------------------------------------------------------------


def fill_peftreg(database_url: str, count: int) -> tuple[list[str], list[int]]:
    """`count` versions of one repository, each tagged `v<n>`; (digests, ids)."""
    from sqlalchemy import insert, select
    from sqlalchemy.orm import Session

    from peftreg.registry.db import migrate
    from peftreg.registry.db.engine import make_engine
    from peftreg.registry.db.models import Manifest, Repository, Tag

    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    digests: list[str] = []
    with Session(engine) as session, session.begin():
        repository = Repository(name=REPO, immutable_tags=[])
        session.add(repository)
        session.flush()
        manifests, tags = [], []
        for number in range(count):
            document = {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "artifactType": "application/vnd.peftreg.artifact.v1",
                "config": {
                    "mediaType": "application/vnd.oci.empty.v1+json",
                    "digest": EMPTY_CONFIG_DIGEST,
                    "size": 2,
                },
                "layers": [],
                "annotations": {"org.example.number": str(number)},
            }
            content = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
            digest = f"sha256:{hashlib.sha256(content).hexdigest()}"
            digests.append(digest)
            manifests.append(
                {
                    "repository_id": repository.id,
                    "digest": digest,
                    "media_type": document["mediaType"],
                    "artifact_type": document["artifactType"],
                    "annotations": document["annotations"],
                    "size": len(content),
                    "content": content,
                    "pushed_by": "bench",
                }
            )
            tags.append(
                {"repository_id": repository.id, "name": f"v{number}", "manifest_digest": digest}
            )
        session.execute(insert(Manifest), manifests)
        session.execute(insert(Tag), tags)
        ids = list(session.scalars(select(Manifest.id).order_by(Manifest.id)))
    with engine.connect() as connection:
        connection.exec_driver_sql("ANALYZE")
        connection.commit()
    engine.dispose()
    return digests, ids


def explain(database_url: str, digests: list[str], ids: list[int]) -> str:
    """The plans of the statements peftreg sends for a listing page from the middle, a
    version's detail and a manifest by tag (captured as sent, with their parameters)."""
    from peftreg.registry.auth.scopes import anonymous_principal
    from peftreg.registry.catalog import manifests, search
    from peftreg.registry.db.engine import make_engine

    engine = make_engine(database_url)
    middle = len(ids) // 2
    requests = {
        "listing": lambda session: search.list_versions(
            session,
            principal=anonymous_principal("read"),
            repository=REPO,
            artifact_type=None,
            annotations={},
            cursor=search.encode_cursor(ids[middle]),
            limit=100,
        ),
        "version detail": lambda session: manifests.get_version(
            session, repository=REPO, reference=digests[middle]
        ),
        "manifest by tag": lambda session: manifests.get_manifest(
            session, repository=REPO, reference=f"v{middle}"
        ),
    }
    sqlite = database_url.startswith("sqlite")
    lines = []
    for label, request in requests.items():
        sent = selects_sent(engine, request)
        with engine.connect() as connection:
            raw = connection.connection.dbapi_connection
            assert raw is not None
            for number, (statement, parameters) in enumerate(sent, 1):
                cursor = raw.cursor()
                cursor.execute(
                    ("EXPLAIN QUERY PLAN " if sqlite else "EXPLAIN ") + statement, parameters
                )
                plan = " | ".join(str(row[-1]).strip() for row in cursor.fetchall())
                cursor.close()
                lines.append(f"  {label} ({number}/{len(sent)}): {plan}")
    engine.dispose()
    return "\n".join(lines)


def selects_sent(engine: Any, request: Any) -> list[tuple[str, object]]:
    """The SELECT statements (with parameters) `request(session)` sends."""
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    sent: list[tuple[str, object]] = []

    def record(
        _c: object, _cursor: object, statement: str, parameters: object, *_a: object
    ) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            sent.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    try:
        with Session(engine) as session:
            request(session)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    return sent


@contextmanager
def peftreg_workers(home: Path, database_url: str, workers: int) -> Iterator[str]:
    port = free_port()
    log = home / "server.log"
    env = clean_env(
        PEFTREG_HOME=str(home),
        PEFTREG_PORT=str(port),
        PEFTREG_DATABASE_URL=database_url,
        PEFTREG_EMBEDDED_WORKER="false",
    )
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*PEFTREG, "serve", "--workers", str(workers), "--log-level", "warning"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_http(f"http://127.0.0.1:{port}/readyz", process, "peftreg serve", log)
            yield f"http://127.0.0.1:{port}"
        finally:
            stop(process)


def peftreg_paths(digests: list[str], ids: list[int]) -> dict[str, list[str]]:
    from peftreg.registry.catalog.search import encode_cursor

    sample = range(0, len(digests), max(1, len(digests) // 2000))
    return {
        "manifest GET by tag": [f"/v2/{REPO}/manifests/v{n}" for n in sample],
        "version detail": [f"/api/v1/repositories/{REPO}/versions/{digests[n]}" for n in sample],
        "version listing (100)": [f"/api/v1/repositories/{REPO}/versions?limit=100"]
        + [
            f"/api/v1/repositories/{REPO}/versions?limit=100&cursor={encode_cursor(ids[n])}"
            for n in sample
            if n >= 100
        ],
    }


# MLflow ----------------------------------------------------------------------

MLFLOW_FILL = """
import sys
from mlflow.tracking import MlflowClient
uri, count = sys.argv[1], int(sys.argv[2])
client = MlflowClient(tracking_uri=uri, registry_uri=uri)
client.create_registered_model(sys.argv[3])
for number in range(count):
    client.create_model_version(sys.argv[3], source=f"s3://bench/models/{number}")
"""


MLFLOW_LOCK = Path(__file__).with_name("mlflow-lock.txt")


def mlflow_venv() -> Path:
    """MLflow in its own environment, installed from its hashed lock (the same release
    every run); reinstalled when the lock changes."""
    venv = Path(os.environ.get("BENCH_MLFLOW_VENV", Path.home() / ".cache/peftreg-bench/mlflow"))
    python = venv / "bin" / "python"
    lock = MLFLOW_LOCK.read_bytes()
    stamp = venv / ".installed"
    if not stamp.exists() or stamp.read_bytes() != lock:
        print(f"installing MLflow into {venv} from {MLFLOW_LOCK.name} ...", flush=True)
        if stamp.exists():  # one this bench made from an older lock: start afresh
            shutil.rmtree(venv)
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
        install = ["install", "--quiet", "--require-hashes", "--no-deps", "-r", str(MLFLOW_LOCK)]
        subprocess.run([str(python), "-m", "pip", *install], check=True)
        stamp.write_bytes(lock)
    return venv


def mlflow_uri(database_url: str) -> str:
    return database_url  # postgresql+psycopg: MLflow's SQLAlchemy takes the same URL


@contextmanager
def mlflow_server(venv: Path, store_uri: str, workdir: Path) -> Iterator[str]:
    port = free_port()
    log = workdir / "mlflow.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                str(venv / "bin" / "mlflow"),
                "server",
                "--backend-store-uri",
                store_uri,
                "--default-artifact-root",
                str(workdir / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                str(MLFLOW_WORKERS),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=workdir,
        )
        try:
            wait_http(f"http://127.0.0.1:{port}/health", process, "mlflow server", log, 300)
            yield f"http://127.0.0.1:{port}"
        finally:
            stop(process)


def mlflow_paths(count: int) -> dict[str, list[str]]:
    import base64

    sample = range(1, count + 1, max(1, count // 2000))
    name = urllib.parse.quote(MODEL)
    query = urllib.parse.quote(f"name='{MODEL}'")

    def token(offset: int) -> str:
        raw = base64.b64encode(json.dumps({"offset": offset}).encode()).decode()
        return urllib.parse.quote(raw)

    get = [f"/api/2.0/mlflow/model-versions/get?name={name}&version={n}" for n in sample]
    search = f"/api/2.0/mlflow/model-versions/search?filter={query}&max_results=100"
    return {
        "get-model-version": get,
        "search-model-versions (100)": [search]
        + [f"{search}&page_token={token(n)}" for n in sample if n <= count - 100],
    }


# the run ---------------------------------------------------------------------


@contextmanager
def database(backend: str, workdir: Path, label: str) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{workdir / f'{label}.db'}"
        return
    from tests.fixtures.postgres import fresh_database, postgres_admin_url

    with fresh_database(postgres_admin_url()) as url:
        yield url


def main() -> int:
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install -y wrk", file=sys.stderr)
        return 1
    sizes = [int(n) for n in os.environ.get("BENCH_API_VERSIONS", "1000,10000").split(",")]
    backends = os.environ.get("BENCH_API_BACKENDS", "sqlite,postgresql").split(",")
    seconds = int(os.environ.get("BENCH_API_SECONDS", "10"))
    workers = int(os.environ.get("BENCH_API_WORKERS", str(os.cpu_count() or 1)))
    venv = mlflow_venv()
    results: dict[tuple[str, int, str], Load] = {}
    plans: dict[str, str] = {}
    for backend in backends:
        for count in sizes:
            with (
                tempfile.TemporaryDirectory(prefix="peftreg-bench-api-") as tmp,
                ExitStack() as stack,
            ):
                root = Path(tmp)
                ours_db = stack.enter_context(database(backend, root, "peftreg"))
                print(f"{backend}, {count} versions: filling peftreg ...", flush=True)
                digests, ids = fill_peftreg(ours_db, count)
                if count == max(sizes):
                    plans[backend] = explain(ours_db, digests, ids)
                (root / "home").mkdir()
                url = stack.enter_context(peftreg_workers(root / "home", ours_db, workers))
                for label, paths in peftreg_paths(digests, ids).items():
                    load = wrk(url, paths, seconds, root)
                    results[(backend, count, f"peftreg {label}")] = load
                    print(f"  peftreg {label}: {load}", flush=True)
                theirs_db = stack.enter_context(database(backend, root, "mlflow"))
                print(f"{backend}, {count} versions: filling MLflow ...", flush=True)
                subprocess.run(  # its errors go to the terminal
                    [
                        str(venv / "bin" / "python"),
                        "-c",
                        MLFLOW_FILL,
                        mlflow_uri(theirs_db),
                        str(count),
                        MODEL,
                    ],
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
                (root / "mlflow").mkdir()
                peer = stack.enter_context(
                    mlflow_server(venv, mlflow_uri(theirs_db), root / "mlflow")
                )
                for label, paths in mlflow_paths(count).items():
                    load = wrk(peer, paths, seconds, root)
                    results[(backend, count, f"MLflow {label}")] = load
                    print(f"  MLflow {label}: {load}", flush=True)
    report(results, plans, sizes, backends, workers)
    return 0


PAIRS = (
    ("peftreg manifest GET by tag", "MLflow get-model-version"),
    ("peftreg version detail", "MLflow get-model-version"),
    ("peftreg version listing (100)", "MLflow search-model-versions (100)"),
)


def report(
    results: dict[tuple[str, int, str], Load],
    plans: dict[str, str],
    sizes: list[int],
    backends: list[str],
    workers: int,
) -> None:
    print(
        f"\n{CONNECTIONS} connections; peftreg serve --workers {workers}, "
        f"MLflow --workers {MLFLOW_WORKERS}\n"
    )
    print(
        f"{'backend':<11}{'versions':>9}  {'endpoint':<38}{'req/s':>9}{'p99 ms':>9}{'errors':>8}"
        f"{'x MLflow':>10}"
    )
    for backend in backends:
        for count in sizes:
            for ours, theirs in PAIRS:
                for label in (ours, theirs):
                    load = results[(backend, count, label)]
                    ratio = ""
                    if label == ours:
                        peer = results[(backend, count, theirs)].requests_per_second
                        rate = load.requests_per_second
                        ratio = f"{rate / peer:10.2f}" if peer else f"{'(peer 0)':>10}"
                    print(
                        f"{backend:<11}{count:>9}  {label:<38}{load.requests_per_second:9.0f}"
                        f"{load.p99_ms:9.1f}{load.errors:8d}{ratio}"
                    )
    if len(sizes) > 1:
        small, large = min(sizes), max(sizes)
        print(f"\np99 at {large} / p99 at {small} versions (target <= 1.2):")
        for backend in backends:
            for ours, _theirs in PAIRS:
                growth = (
                    results[(backend, large, ours)].p99_ms / results[(backend, small, ours)].p99_ms
                )
                print(f"  {backend:<11}{ours:<38}{growth:6.2f}")
    for backend, plan in plans.items():
        print(f"\nquery plans on {backend} at {max(sizes)} versions:\n{plan}")


if __name__ == "__main__":
    sys.exit(main())
