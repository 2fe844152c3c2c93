"""Requests' read transactions run a few at a time per process (`Settings.db_read_threads`)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import anyio
from sqlalchemy import select
from sqlalchemy.orm import Session

from peftreg.registry.api.deps import in_read_transaction
from peftreg.registry.app import build_services
from peftreg.registry.settings import Settings

WAIT = 30  # seconds: only a broken limiter makes a wait run this long


def test_sqlite_reads_one_at_a_time_a_network_database_two_unless_set(tmp_path: Path) -> None:
    sqlite = f"sqlite:///{tmp_path / 'peftreg.db'}"
    postgres = "postgresql+psycopg://registry@db.internal:5432/peftreg"
    assert Settings(home=tmp_path, database_url=sqlite).resolved_db_read_threads() == 1
    assert Settings(home=tmp_path, database_url=postgres).resolved_db_read_threads() == 2
    configured = Settings(home=tmp_path, database_url=sqlite, db_read_threads=4)
    assert configured.resolved_db_read_threads() == 4


def test_read_transactions_past_the_limit_wait_their_turn_and_all_finish(
    database_url: str, tmp_path: Path
) -> None:
    services = build_services(
        Settings(home=tmp_path, database_url=database_url, auto_migrate=True, db_read_threads=2)
    )
    changed = threading.Condition()
    release = threading.Event()
    running = peak = finished = 0

    def work(session: Session) -> int:
        nonlocal running, peak
        with changed:
            running += 1
            peak = max(peak, running)
            changed.notify_all()
        assert release.wait(WAIT)
        value = session.execute(select(1)).scalar_one()
        with changed:
            running -= 1
        return value

    def two_running() -> bool:
        with changed:
            return changed.wait_for(lambda: running == 2, WAIT)

    async def one() -> None:
        nonlocal finished
        assert await in_read_transaction(services, work) == 1
        finished += 1

    async def main() -> None:
        async with anyio.create_task_group() as group:
            for _ in range(5):
                group.start_soon(one)
            assert await anyio.to_thread.run_sync(two_running)
            await anyio.wait_all_tasks_blocked()
            # Two in their transactions, three queued on the event loop, none on a thread.
            assert services.read_threads.statistics().tasks_waiting == 3
            assert running == 2
            release.set()

    try:
        asyncio.run(main())
    finally:
        services.engine.dispose()
    assert (peak, finished, running) == (2, 5, 0)
