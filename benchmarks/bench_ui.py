"""Server time per web UI page at 10,000 versions in one repository (target: < 50 ms).

Starts a real `peftreg serve` (SQLite + filesystem) in a temporary directory,
pushes one real base and LoRA adapter, then adds 9,999 more versions of that
adapter's repository straight into the database (the same manifest and config
under distinct digests, indexed like pushed adapters, every tenth tagged, a
channel tag moved 200 times). Each page is fetched `--repeat` times over
loopback HTTP; the table gives the median and p95 wall time per request, and
the floor measured in the same run: a static file of the UI (routing, no
database).

Run: `.venv/bin/python benchmarks/bench_ui.py [--versions 10000] [--repeat 30]`.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peftreg.registry.app import build_services
from peftreg.registry.catalog.search import encode_cursor
from peftreg.registry.db.models import ArtifactIndex, Manifest, Repository, Tag, TagEvent
from peftreg.registry.settings import Settings
from peftreg.sdk.client import Client
from tests.fixtures.server import start_registry
from tests.jobs.artifacts import push_base_and_adapter

REPOSITORY = "acme/bot"


def fill(home: Path, versions: int) -> tuple[str, int]:
    """Add versions to REPOSITORY; (a digest in the middle, the id of a deep page's cursor)."""
    services = build_services(Settings(home=home, embedded_worker=False, auto_migrate=False))
    moment = datetime.now(UTC)
    with services.transaction() as session:
        repo = session.query(Repository).filter_by(name=REPOSITORY).one()
        template = session.query(Manifest).filter_by(repository_id=repo.id).one()
        index = session.get(ArtifactIndex, template.id)
        assert index is not None
        middle, deep = "", 0
        for number in range(1, versions):
            digest = "sha256:" + hashlib.sha256(f"version {number}".encode()).hexdigest()
            row = Manifest(
                repository_id=repo.id,
                digest=digest,
                media_type=template.media_type,
                artifact_type=template.artifact_type,
                config_digest=template.config_digest,
                subject_digest=None,
                annotations={},
                size=template.size,
                content=template.content,
                pushed_by="bench",
                created_at=moment + timedelta(seconds=number),
            )
            session.add(row)
            session.flush()
            session.add(
                ArtifactIndex(
                    manifest_id=row.id,
                    kind="lora" if number % 3 else "dora",
                    base_fingerprint=index.base_fingerprint,
                    base_structure_hash=index.base_structure_hash,
                    max_rank=4 * (1 + number % 8),
                    base_quantization="none" if number % 5 else "nf4",
                    verified=bool(number % 7),
                    fingerprint=None,
                )
            )
            if number % 10 == 0:
                session.add(
                    Tag(repository_id=repo.id, name=f"build-{number}", manifest_digest=digest)
                )
            if number == versions // 2:
                middle, deep = digest, row.id
        for move in range(200):
            session.add(
                TagEvent(
                    repository_id=repo.id,
                    tag="prod",
                    from_digest=None if move == 0 else middle,
                    to_digest=middle,
                    actor="bench",
                    at=moment + timedelta(seconds=move),
                )
            )
        session.add(Tag(repository_id=repo.id, name="prod", manifest_digest=middle))
    services.engine.dispose()
    return middle, deep


def time_page(http: httpx.Client, path: str, repeat: int) -> tuple[float, float]:
    response = http.get(path)  # warm: templates compiled, caches filled
    assert response.status_code == 200, (path, response.status_code, response.text[:300])
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        response = http.get(path)
        samples.append(time.perf_counter() - started)
        assert response.status_code == 200
    samples.sort()
    return statistics.median(samples) * 1000, samples[int(len(samples) * 0.95) - 1] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        server = start_registry(root / "home", {"PEFTREG_EMBEDDED_WORKER": "false"})
        try:
            client = Client(server.url, cache=root / "cache")
            push_base_and_adapter(client, root, repository=REPOSITORY)
            middle, deep = fill(root / "home", args.versions)
            pages = {
                "floor: static css": "/ui/static/ui.css",
                "repositories": "/ui/",
                "versions, page 1": f"/ui/r/{REPOSITORY}",
                "versions, deep page": f"/ui/r/{REPOSITORY}?cursor={encode_cursor(deep)}",
                "versions, filtered": f"/ui/r/{REPOSITORY}?kind=dora&max_rank=8&verified=no",
                "all versions": "/ui/versions",
                "version card": f"/ui/r/{REPOSITORY}/-/versions/{middle}",
                "tags": f"/ui/r/{REPOSITORY}/-/tags",
                "tag history (200 moves)": f"/ui/r/{REPOSITORY}/-/tags/prod",
                "lineage": f"/ui/r/{REPOSITORY}/-/lineage/{middle}",
                "jobs": "/ui/jobs",
            }
            print(f"{args.versions} versions in {REPOSITORY}; {args.repeat} requests per page")
            print(f"{'PAGE':28} {'MEDIAN ms':>10} {'P95 ms':>8}")
            with httpx.Client(base_url=server.url, timeout=30) as http:
                for label, path in pages.items():
                    median, p95 = time_page(http, path, args.repeat)
                    print(f"{label:28} {median:10.1f} {p95:8.1f}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
