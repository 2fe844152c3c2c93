"""Fixtures of the client tests: an isolated CLI environment and a CLI runner."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fixtures.cli import CliEnv
from tests.fixtures.server import RegistryProcess

CLIENT_ENV = ("PEFTREG_URL", "PEFTREG_TOKEN", "PEFTREG_CACHE", "PEFTREG_CONFIG", "PEFTREG_OFFLINE")


@pytest.fixture(autouse=True)
def _no_client_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in CLIENT_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def make_env(tmp_path: Path) -> Callable[[str], CliEnv]:
    def make(url: str) -> CliEnv:
        cache = tmp_path / "cache"
        config = tmp_path / "config" / "config.json"
        env = {
            "PEFTREG_URL": url,
            "PEFTREG_CACHE": str(cache),
            "PEFTREG_CONFIG": str(config),
            "PEFTREG_RETRIES": "1",
        }
        return CliEnv(env, cache, config)

    return make


@pytest.fixture
def cli_env(registry_server: RegistryProcess, make_env: Callable[[str], CliEnv]) -> CliEnv:
    return make_env(registry_server.url)


def make_tree(root: Path, big: int = 20 * 1024 * 1024) -> Path:
    """A directory with nested files, an empty file and one over a chunk."""
    (root / "weights" / "nested").mkdir(parents=True)
    (root / "adapter_config.json").write_text('{"r": 8}')
    (root / "README.md").write_text("# demo\n")
    (root / "empty.txt").write_bytes(b"")
    (root / "weights" / "nested" / "small.bin").write_bytes(os.urandom(1000))
    (root / "weights" / "adapter.safetensors").write_bytes(os.urandom(big))
    return root


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }
