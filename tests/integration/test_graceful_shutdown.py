"""A server told to stop (SIGTERM) answers its long polls at once instead of holding its
graceful shutdown until the timeout cancels them unanswered: a tag watch answers unchanged,
a job's event stream ends cleanly, and the server exits with nothing cancelled."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from peftreg.registry.app import build_services
from peftreg.registry.jobs import queue
from peftreg.registry.settings import Settings
from tests.fixtures.server import RegistryProcess, clean_environment
from tests.integration.oci_helpers import make_artifact, push_artifact
from tests.integration.test_watch import watches_in_flight

REPO = "acme/draining"


@pytest.fixture(params=[1, 2], ids=["one-process", "two-workers"])
def stopping_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RegistryProcess]:
    # No embedded worker: the job below stays queued, so its event stream stays open.
    env = {**clean_environment(), "PEFTREG_EMBEDDED_WORKER": "false"}
    serve_args = ["--log-level", "warning", "--workers", str(request.param)]
    process = RegistryProcess(home=tmp_path / "home", env=env, serve_args=serve_args).start()
    yield process
    process.kill()


def _queued_job(home: Path) -> str:
    services = build_services(Settings(home=home, embedded_worker=False))
    try:
        with services.transaction() as session:
            enqueued = queue.enqueue(
                session,
                kind="export",
                inputs={"adapters": []},
                params={},
                actor="test",
                max_attempts=1,
            )
            return enqueued.job.id
    finally:
        services.engine.dispose()


def test_sigterm_answers_a_tag_watch_and_ends_an_event_stream(
    stopping_server: RegistryProcess,
) -> None:
    server = stopping_server
    with httpx.Client(base_url=server.url, timeout=60) as http:
        digest = push_artifact(http, REPO, "prod", make_artifact(b"one", name="draining-1"))
    job_id = _queued_job(server.home)

    watched: list[httpx.Response | BaseException] = []
    streamed: list[str | BaseException] = []
    first_event = threading.Event()

    def watch() -> None:
        try:
            watched.append(
                httpx.get(
                    f"{server.url}/api/v1/repositories/{REPO}/tags/prod/watch",
                    params={"digest": digest, "timeout": 60},
                    timeout=60,
                )
            )
        except BaseException as exc:
            watched.append(exc)

    def stream() -> None:
        try:
            url = f"{server.url}/ui/jobs/{job_id}/events"
            with httpx.stream("GET", url, timeout=60) as response:
                assert response.status_code == 200, response.read()
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        streamed.append(line)
                        first_event.set()
            streamed.append("closed")
        except BaseException as exc:
            streamed.append(exc)
            first_event.set()

    threads = [threading.Thread(target=watch), threading.Thread(target=stream)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    with httpx.Client(base_url=server.url, timeout=10) as http:
        while watches_in_flight(http) < 1:  # the watch waits on the server now
            assert time.monotonic() < deadline, "the watch never started waiting"
    assert first_event.wait(60)  # the stream is open and has sent the queued job

    server.stop()
    for thread in threads:
        thread.join(60)

    # One process re-raises the signal once its shutdown is done, a supervisor exits 0;
    # neither was killed after 15 s (-9).
    assert server.process is not None
    assert server.process.returncode in (0, -signal.SIGTERM)
    answer = watched[0]
    assert isinstance(answer, httpx.Response), answer
    assert answer.status_code == 200
    assert answer.json() == {"tag": "prod", "digest": digest, "changed": False}
    assert streamed[-1] == "closed", streamed
    assert '"status": "queued"' in streamed[0]
    assert "graceful shutdown exceeded" not in server.log_tail()
