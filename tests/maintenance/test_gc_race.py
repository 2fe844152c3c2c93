"""Garbage collection running in a loop while 100 pushes race it, then an exact reclaim.

The loop: eight threads push 100 artifacts through the SDK (32 on PostgreSQL
+ S3, to stay fast), while another thread runs `collect_garbage` over and
over with a short grace period. The pushes are built to hit every race GC
must survive:

- each push names a blob already linked in its repository but unreferenced,
  which turns stale (older than the grace period) as the push starts: the
  SDK's HEAD says it exists and skips the upload, while GC may be deleting
  it (the test prints how often each side won);
- each push mounts a stale blob from a pool repository (`mount_from`);
- all pushes share a few layers and the empty config, committed concurrently;
- every fifth push deletes its version right away, making new garbage.

Every push and a pull of every surviving version must succeed. Then, with
everything old except one fresh blob, and an expired upload session, `peftreg
gc` must remove exactly the store objects that no surviving manifest names
(computed here from what the test pushed), minus the fresh one, and report
their exact size.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from sqlalchemy import select, update

from peftreg.digest import Digest
from peftreg.registry.db.models import AuditEvent, Blob, UploadSession
from peftreg.registry.maintenance.fsck import check_store
from peftreg.registry.maintenance.gc import GcReport, collect_garbage
from peftreg.registry.state import Services
from peftreg.sdk import Client, NotFound
from tests.integration.oci_helpers import push_blob
from tests.maintenance.conftest import Backend

THREADS = 8
SHARED = [hashlib.sha256(f"shared-{k}".encode()).digest() * 256 for k in range(3)]
# Stale blobs are made stale explicitly (`set_touched`); everything a push
# uploads stays fresh for a minute, however loaded the machine running this.
LOOP_GRACE = timedelta(seconds=60)
POOL = "seed/pool"
PUSHES = {"sqlite": 100, "postgres-s3": 32}


def digest_of(data: bytes) -> str:
    return str(Digest.of_bytes(data))


def stale_content(index: int) -> bytes:
    return f"stale blob of push {index}\n".encode() * 90


def pooled_content(index: int) -> bytes:
    return f"pooled blob of push {index}\n".encode() * 80


def unique_content(index: int) -> bytes:
    return f"unique layer of push {index}\n".encode() * 120


@dataclass
class Push:
    index: int
    repository: str
    files: dict[str, bytes]
    deleted: bool
    digest: str = ""

    @property
    def reference(self) -> str:
        return f"{self.repository}:t{self.index}"

    def referenced(self) -> set[str]:
        return {digest_of(b"{}")} | {digest_of(data) for data in self.files.values()}


@dataclass
class Contents:
    """Every byte string the test put into the registry, by digest."""

    by_digest: dict[str, bytes] = field(default_factory=dict)

    def add(self, data: bytes) -> str:
        digest = digest_of(data)
        self.by_digest[digest] = data
        return digest

    def size(self, digest: str) -> int:
        assert digest in self.by_digest, f"the store holds {digest}, which the test never pushed"
        return len(self.by_digest[digest])


def plan(count: int) -> list[Push]:
    pushes = []
    for index in range(count):
        files = {
            "2-shared.bin": SHARED[index % len(SHARED)],
            "0-stale.bin": stale_content(index),
            "1-pooled.bin": pooled_content(index),
            "3-unique.bin": unique_content(index),
        }
        pushes.append(Push(index, f"team{index % 4}/model", files, deleted=index % 5 == 4))
    return pushes


def set_touched(
    services: Services,
    when: datetime,
    *,
    keep: set[str] | None = None,
    only: set[str] | None = None,
) -> None:
    """Set blobs' last use (all, all but `keep`, or `only` these)."""
    with services.transaction() as session:
        statement = update(Blob).values(touched_at=when)
        if keep:
            statement = statement.where(Blob.digest.not_in(keep))
        if only is not None:
            statement = statement.where(Blob.digest.in_(only))
        session.execute(statement)


def an_hour(sign: int) -> datetime:
    return datetime.now(UTC) + sign * timedelta(hours=1)


def seed_stale(url: str, pushes: list[Push], contents: Contents) -> list[str]:
    """Link every push's stale blob in its repository and its pooled blob in the pool;
    plus blobs no push uses (which the loop's GC must remove). Returns the latter."""
    seeds = [(push.repository, push.files["0-stale.bin"]) for push in pushes]
    seeds += [(POOL, push.files["1-pooled.bin"]) for push in pushes]
    doomed = [f"doomed {index}".encode() * 50 for index in range(5)]
    seeds += [(POOL, data) for data in doomed]
    for _, data in seeds:
        contents.add(data)

    def seed(item: tuple[str, bytes]) -> int:
        with httpx.Client(base_url=url, timeout=60) as client:
            return push_blob(client, *item).status_code

    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        assert set(pool.map(seed, seeds)) == {201}
    return [digest_of(data) for data in doomed]


def push_one(
    url: str, services: Services, push: Push, work: Path, start: threading.Barrier
) -> None:
    folder = work / f"push-{push.index}"
    folder.mkdir()
    for name, data in push.files.items():
        (folder / name).write_bytes(data)
    with Client(url, retries=0, cache=work / f"cache-{push.index}") as client:
        if push.index < THREADS:  # the first push of each thread starts with the GC loop
            start.wait(timeout=60)
        # Its stale blobs become collectable now: the push's HEAD (or mount)
        # and the GC loop race for them.
        stale = {digest_of(push.files["0-stale.bin"]), digest_of(push.files["1-pooled.bin"])}
        set_touched(services, an_hour(-1), only=stale)
        result = client.push(folder, push.reference, mount_from=POOL)
        push.digest = str(result.digest)
        if push.deleted:
            client.delete_version(push.repository, push.digest, force=True)


def pull_and_compare(url: str, push: Push, work: Path) -> None:
    output = work / f"pulled-{push.index}"
    with Client(url, retries=0, cache=work / f"pull-cache-{push.index}") as client:
        result = client.pull(push.reference, output=output)
    assert str(result.digest) == push.digest
    for name, data in push.files.items():
        assert (output / name).read_bytes() == data, f"{push.reference}: {name} differs"


def gc_loop(services: Services, stop: threading.Event, start: threading.Barrier) -> list[GcReport]:
    reports = []
    pacing = random.Random(7)
    start.wait(timeout=60)
    while not stop.is_set():
        reports.append(collect_garbage(services, dry_run=False, grace=LOOP_GRACE, batch=7))
        # Irregular pacing (not synchronisation): sometimes a push's HEAD or
        # mount comes first, sometimes the collector.
        stop.wait(pacing.uniform(0, 0.25))
    reports.append(collect_garbage(services, dry_run=False, grace=LOOP_GRACE, batch=7))
    return reports


def race_outcomes(services: Services, pushes: list[Push]) -> tuple[int, int]:
    """How the races for stale blobs went: (kept by HEAD/mount, collected and re-uploaded)."""
    stale = {digest_of(p.files["0-stale.bin"]) for p in pushes}
    stale |= {digest_of(p.files["1-pooled.bin"]) for p in pushes}
    with services.transaction() as session:
        uploads = Counter(
            session.scalars(
                select(AuditEvent.target).where(
                    AuditEvent.action == "blob.upload", AuditEvent.target.in_(stale)
                )
            )
        )
    lost = sum(1 for digest in stale if uploads[digest] > 1)
    return len(stale) - lost, lost


def expire_upload_session(client: httpx.Client, services: Services, backend: Backend) -> str:
    """An upload session with bytes, idle for two days (row and, on files, the data)."""
    started = client.post("/v2/team0/model/blobs/uploads/")
    assert started.status_code == 202, started.text
    location = started.headers["Location"]
    patched = client.patch(location, content=b"never finished", headers={"Content-Range": "0-13"})
    assert patched.status_code == 202, patched.text
    upload_id = started.headers["Docker-Upload-UUID"]
    two_days_ago = datetime.now(UTC) - timedelta(days=2)
    with services.transaction() as session:
        session.execute(
            update(UploadSession)
            .where(UploadSession.id == upload_id)
            .values(updated_at=two_days_ago, created_at=two_days_ago)
        )
    if backend.name == "sqlite":
        data = backend.home / "storage" / "uploads" / upload_id / "data"
        os.utime(data, (two_days_ago.timestamp(), two_days_ago.timestamp()))
    return location


def abandoned_store_session(backend: Backend) -> Path:
    """Upload bytes with no session row (a crash between store and database), two days old."""
    directory = backend.home / "storage" / "uploads" / str(uuid.uuid4())
    directory.mkdir(parents=True)
    (directory / "data").write_bytes(b"orphaned upload")
    old = (datetime.now(UTC) - timedelta(days=2)).timestamp()
    os.utime(directory / "data", (old, old))
    return directory


def test_gc_races_pushes_then_reclaims_exactly_the_garbage(
    backend: Backend, tmp_path: Path
) -> None:
    # The servers' grace matches the loop's: a HEAD refreshes a blob last
    # touched more than half of it ago (all stale blobs here).
    server = backend.start({"PEFTREG_GC_GRACE_SECONDS": str(LOOP_GRACE.total_seconds())})
    services = backend.services()
    pushes = plan(PUSHES[backend.name])
    contents = Contents()
    contents.add(b"{}")
    for data in SHARED:
        contents.add(data)
    for push in pushes:
        contents.add(push.files["3-unique.bin"])
    try:
        doomed = seed_stale(server.url, pushes, contents)
        # Seeding outlasts the grace period: the stale blobs stay pinned (used
        # an hour from now) until their push starts; the doomed ones are old.
        set_touched(services, an_hour(+1))
        set_touched(services, an_hour(-1), only=set(doomed))

        # The race: pushes against a GC loop.
        stop = threading.Event()
        start = threading.Barrier(THREADS + 1)
        work = tmp_path / "work"
        work.mkdir()
        began = time.monotonic()
        with ThreadPoolExecutor(max_workers=1) as gc_thread:
            loop = gc_thread.submit(gc_loop, services, stop, start)
            try:
                with ThreadPoolExecutor(max_workers=THREADS) as pool:
                    list(pool.map(lambda p: push_one(server.url, services, p, work, start), pushes))
            finally:
                stop.set()
            reports = loop.result(timeout=120)
        race_seconds = time.monotonic() - began
        removed_in_loop = {digest for report in reports for digest in report.removed}
        assert len(reports) >= 3, f"GC ran only {len(reports)} times in {race_seconds:.1f}s"
        assert set(doomed) <= removed_in_loop, "the loop's GC removed the stale unused blobs"

        live = [push for push in pushes if not push.deleted]
        with ThreadPoolExecutor(max_workers=THREADS) as pool:
            list(pool.map(lambda p: pull_and_compare(server.url, p, work), live))
        with Client(server.url, retries=0, cache=work / "check") as sdk:
            for push in pushes:
                if push.deleted:
                    try:
                        sdk.resolve(push.reference)
                    except NotFound:
                        continue
                    raise AssertionError(f"{push.reference} was deleted but still resolves")

        # Exact reclaim: everything old but one fresh unreferenced blob.
        with httpx.Client(base_url=server.url, timeout=60) as client:
            fresh = contents.add(b"fresh and unreferenced" * 40)
            assert push_blob(client, POOL, contents.by_digest[fresh]).status_code == 201
            set_touched(services, an_hour(-1), keep={fresh})
            expired = expire_upload_session(client, services, backend)
        expected_uploads = 1
        abandoned = None
        if backend.name == "sqlite":
            abandoned = abandoned_store_session(backend)
            expected_uploads += 1

        referenced = {digest for push in live for digest in push.referenced()}
        stored = {str(digest) for digest in services.store.list_digests()}
        assert referenced <= stored, "every blob a surviving manifest names is stored"
        garbage = stored - referenced - {fresh}
        assert garbage, "deleted versions left garbage to collect"
        garbage_bytes = sum(contents.size(digest) for digest in garbage)

        dry = collect_garbage(services, dry_run=True, grace=timedelta(seconds=60))
        assert set(dry.removed) == garbage
        assert dry.bytes_reclaimed == garbage_bytes
        after_dry_run = {str(d) for d in services.store.list_digests()}
        assert after_dry_run == stored, "a dry run deletes nothing"

        ran = backend.cli("gc", "--grace", "60s", "--force", "--json")
        assert ran.exit_code == 0, ran.output
        report = json.loads(ran.stdout)
        assert set(report["removed"]) == garbage
        assert report["bytes_reclaimed"] == garbage_bytes
        assert report["blobs_removed"] + report["orphans_removed"] == len(garbage)
        assert report["repository_links_removed"] >= report["blobs_removed"]
        assert report["uploads_removed"] == expected_uploads
        assert {str(d) for d in services.store.list_digests()} == referenced | {fresh}
        if abandoned is not None:
            assert not abandoned.exists()

        fsck = check_store(services)
        assert fsck.problems == [], [problem.describe() for problem in fsck.problems]
        with httpx.Client(base_url=server.url, timeout=60) as client:
            assert client.get(expired).status_code == 404
            audit = client.get("/api/v1/audit", params={"limit": 1000}).json()
            assert any(event["action"] == "gc.run" for event in audit)
        pull_and_compare(server.url, live[-1], tmp_path / "again")
        won, lost = race_outcomes(services, pushes)
        print(
            f"{backend.name}: {len(pushes)} pushes in {race_seconds:.1f}s against "
            f"{len(reports)} GC runs that removed {len(removed_in_loop)} blobs; "
            f"stale blobs kept by the push's HEAD or mount: {won}, collected first and "
            f"uploaded again: {lost}; final GC reclaimed {garbage_bytes} bytes "
            f"in {len(garbage)} objects"
        )
    finally:
        services.engine.dispose()
        server.stop()
