"""Backends for the maintenance tests: SQLite + filesystem, PostgreSQL + S3 (SeaweedFS)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from peftreg.cli.main import cli
from peftreg.registry.app import build_services
from peftreg.registry.settings import Settings
from peftreg.registry.state import Services
from tests.fixtures.postgres import fresh_database, postgres_admin_url
from tests.fixtures.seaweed import SeaweedS3, run_seaweed
from tests.fixtures.server import RegistryProcess, start_registry


@dataclass
class Backend:
    """Where a registry keeps its state; the server, the CLI and the test share it."""

    name: str
    home: Path
    env: dict[str, str]

    def settings(self) -> Settings:
        values = {key.removeprefix("PEFTREG_").lower(): value for key, value in self.env.items()}
        return Settings(home=self.home, **values)  # type: ignore[arg-type]

    def services(self) -> Services:
        return build_services(self.settings())

    def start(self, extra: dict[str, str] | None = None) -> RegistryProcess:
        return start_registry(self.home, {**self.env, **(extra or {})})

    def cli(self, *args: str) -> Result:
        """`peftreg ARGS` as an operator runs it beside the server (in this process)."""
        env = {**self.env, "PEFTREG_HOME": str(self.home)}
        return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


@pytest.fixture(scope="module")
def seaweed() -> Iterator[SeaweedS3]:
    with run_seaweed() as server:
        yield server


@pytest.fixture(
    params=["sqlite", pytest.param("postgres-s3", marks=[pytest.mark.postgres, pytest.mark.s3])]
)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    home = tmp_path / "home"
    if request.param == "sqlite":
        yield Backend("sqlite", home, {})
        return
    seaweed: SeaweedS3 = request.getfixturevalue("seaweed")
    bucket = seaweed.create_bucket()
    try:
        with fresh_database(postgres_admin_url()) as url:
            yield Backend(
                "postgres-s3",
                home,
                {
                    "PEFTREG_DATABASE_URL": url,
                    "PEFTREG_AUTO_MIGRATE": "true",
                    "PEFTREG_STORAGE": "s3",
                    "PEFTREG_S3_ENDPOINT_URL": seaweed.endpoint_url,
                    "PEFTREG_S3_BUCKET": bucket,
                    "PEFTREG_S3_PREFIX": "registry",
                    "PEFTREG_S3_REGION": seaweed.region,
                    "PEFTREG_S3_ACCESS_KEY_ID": seaweed.access_key_id,
                    "PEFTREG_S3_SECRET_ACCESS_KEY": seaweed.secret_access_key,
                },
            )
    finally:
        seaweed.delete_bucket(bucket)


@pytest.fixture
def sqlite_backend(tmp_path: Path) -> Backend:
    return Backend("sqlite", tmp_path / "home", {})
