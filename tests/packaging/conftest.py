"""The built wheel, and fresh virtual environments with it installed per role."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.packaging.lock import ROOT, locked_versions

SOURCES = ("pyproject.toml", "README.md", "peftreg", "client", "registry", "migrations")


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built without build isolation from a copy of the sources (an
    in-tree build would leave build/ and *.egg-info in the checkout, and setuptools reuses a
    stale build/lib). The links that map the folders into `peftreg` are copied as links."""
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        path = ROOT / name
        if path.is_symlink():
            (src / name).symlink_to(path.readlink())
        elif path.is_dir():
            shutil.copytree(path, src / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("wheel")
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps"]
    subprocess.run(
        [*pip_wheel, "--no-build-isolation", "--no-cache-dir", "--wheel-dir", str(out), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("peftreg-*.whl")
    return built


@pytest.fixture(scope="session")
def constraints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The lock as pip constraints (versions without hashes): installs match the lock."""
    path = tmp_path_factory.mktemp("constraints") / "constraints.txt"
    pins = sorted(f"{name}=={version}" for name, version in locked_versions().items())
    path.write_text("\n".join(pins) + "\n")
    return path


InstallRole = Callable[[str], Path]


@pytest.fixture(scope="session")
def role_environment(
    tmp_path_factory: pytest.TempPathFactory, wheel: Path, constraints: Path
) -> InstallRole:
    """A fresh virtual environment with the wheel installed with `extras` ("" for none;
    "+torch" at the end adds the locked torch, as a user installs it); its `bin/`."""
    made: dict[str, Path] = {}

    def install(extras: str) -> Path:
        if extras not in made:
            where = tmp_path_factory.mktemp(f"venv-{extras.replace('+', '-') or 'base'}")
            # No pip of its own (ensurepip takes seconds): the running pip installs
            # into it (`--python`), as the environment's own pip would.
            venv.create(where, with_pip=False, symlinks=True)
            bin_dir = where / "bin"
            names, _, torch = extras.partition("+")
            targets = [f"peftreg[{names}] @ {wheel.as_uri()}" if names else str(wheel)]
            targets += ["torch"] if torch else []
            # No byte-compiling of every installed file (torch has thousands): imports
            # compile what they use.
            pip = [sys.executable, "-m", "pip", "--python", str(bin_dir / "python")]
            pip += ["install", "--quiet", "--no-compile"]
            installed = subprocess.run(
                [*pip, "--disable-pip-version-check", "--constraint", str(constraints), *targets],
                check=False,
                capture_output=True,
                text=True,
            )
            assert installed.returncode == 0, installed.stderr[-2000:]
            made[extras] = bin_dir
        return made[extras]

    return install
