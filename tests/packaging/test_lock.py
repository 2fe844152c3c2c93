"""The lock is what pyproject.toml asks for: every declared requirement is pinned, at a
version its range allows, with hashes; a drifted pyproject fails here until `make lock`."""

from __future__ import annotations

from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.packaging.lock import LOCK, PIN, declared_requirements, locked_versions


def mismatches(requirements: list[Requirement], locked: dict[str, str]) -> list[str]:
    problems = []
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        if name not in locked:
            problems.append(f"{requirement} is not in the lock")
        elif not requirement.specifier.contains(Version(locked[name]), prereleases=True):
            problems.append(f"{requirement}: the lock pins {locked[name]}")
    return problems


def test_every_declared_requirement_is_locked_within_its_range() -> None:
    assert mismatches(declared_requirements(), locked_versions()) == []


def test_a_drifted_requirement_is_reported(tmp_path: Path) -> None:
    locked = locked_versions()
    drifted = [Requirement(f"transformers>{locked['transformers']}"), Requirement("left-pad>=1")]
    assert mismatches(drifted, locked) == [
        f"transformers>{locked['transformers']}: the lock pins {locked['transformers']}",
        "left-pad>=1 is not in the lock",
    ]


def test_every_pin_has_a_hash_and_torch_is_the_cpu_build() -> None:
    text = LOCK.read_text()
    starts = [match.start() for match in PIN.finditer(text)]
    assert len(starts) == len(locked_versions()) > 50
    for start, end in zip(starts, [*starts[1:], len(text)], strict=True):
        assert "--hash=sha256:" in text[start:end], text[start:end]
    assert locked_versions()["torch"] == "2.13.0+cpu"
    assert "peftreg @" not in LOCK.read_text()  # the project is installed on its own


def test_the_adapterhub_lock_pins_its_library_with_hashes_and_the_same_cpu_torch() -> None:
    """AdapterHub's environment (.venv-adapters) is locked like the main one: its library,
    the transformers it needs, and the main lock's CPU build of torch (never CUDA wheels)."""
    lock = LOCK.with_name("adapters-lock.txt")
    text = lock.read_text()
    pinned = locked_versions(lock)
    starts = [match.start() for match in PIN.finditer(text)]
    for start, end in zip(starts, [*starts[1:], len(text)], strict=True):
        assert "--hash=sha256:" in text[start:end], text[start:end]
    assert pinned["adapters"] == "1.3.0"
    assert pinned["transformers"].startswith("4.57.")
    assert pinned["torch"] == locked_versions()["torch"] == "2.13.0+cpu"
    assert not [name for name in pinned if name.startswith(("nvidia-", "triton"))]
