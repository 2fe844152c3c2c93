"""Fixtures shared by every tier: a real registry process on SQLite + filesystem."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import Result

from tests.fixtures.cli import CliEnv
from tests.fixtures.server import RegistryProcess, start_registry

ADMIN_TOKEN = "test-admin-token"
ROOT = Path(__file__).resolve().parent.parent

# The test files that take longest (about 8 s or more of one process, measured with
# `--junitxml`), longest first. `make test` hands whole files to its two processes in
# collection order (`--dist loadfile --no-loadscope-reorder`): these go first, so that
# no long file starts last and runs alone while the other process idles.
LONGEST_FIRST = (
    "tests/packaging/test_install.py",
    "tests/maintenance/test_gc_race.py",
    "tests/browser/test_ui.py",
    "tests/jobs/test_export.py",
    "tests/storage/test_blobstore_conformance.py",
    "tests/integration/test_oci_api.py",
    "tests/integration/test_openapi_conformance.py",
    "tests/adapterhub/test_adapterhub.py",
    "tests/adapters/test_peft_type_table.py",
    "tests/client/test_transfers.py",
    "tests/maintenance/test_gc.py",
    "tests/jobs/test_export_calibrated.py",
    "tests/gguf/test_export_job.py",
    "tests/integration/test_postgres_s3.py",
    "tests/integration/test_serve_workers.py",
    "tests/jobs/test_worker_crash.py",
    "tests/integration/test_concurrent_pushes.py",
    "tests/storage/test_s3_streaming.py",
    "tests/db/test_migrations.py",
    "tests/quantize/test_calibrated.py",
)

# Nothing is downloaded at test time: transformers and peft never ask a hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest files first (`LONGEST_FIRST`), the rest in collection order."""
    rank = {path: place for place, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.relative_to(ROOT).as_posix(), len(rank)))


@pytest.fixture
def registry_server(tmp_path: Path) -> Iterator[RegistryProcess]:
    """The embedded default: SQLite + filesystem, anonymous access on loopback."""
    server = start_registry(tmp_path / "home")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    """One embedded-default registry per test module (a folder or module may define its own)."""
    process = start_registry(tmp_path_factory.mktemp("registry") / "home")
    yield process
    process.stop()


@pytest.fixture
def cli(server: RegistryProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliEnv:
    """The CLI against the module's `server`: a fresh cache and config per test, and no
    PEFTREG_* variable of the caller's environment."""
    for name in list(os.environ):
        if name.startswith("PEFTREG_"):
            monkeypatch.delenv(name)
    return CliEnv.for_registry(server.url, tmp_path)


@pytest.fixture
def run(
    registry_server: RegistryProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Result]:
    """`peftreg ARGS` in-process against the test's own `registry_server`."""
    for name in list(os.environ):
        if name.startswith("PEFTREG_"):
            monkeypatch.delenv(name)
    return CliEnv.for_registry(registry_server.url, tmp_path / "cli").run


@pytest.fixture
def secured_server(tmp_path: Path) -> Iterator[RegistryProcess]:
    """A registry that needs tokens: anonymous access off, a bootstrap admin token."""
    server = start_registry(
        tmp_path / "home",
        {
            "PEFTREG_ANONYMOUS": "none",
            "PEFTREG_ADMIN_TOKEN": ADMIN_TOKEN,
            "PEFTREG_EMBEDDED_WORKER": "false",  # jobs stay queued: nothing runs them
        },
    )
    yield server
    server.stop()
