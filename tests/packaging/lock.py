"""Reading requirements/lock.txt and the requirements pyproject.toml declares."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements" / "lock.txt"
PYPROJECT = ROOT / "pyproject.toml"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", re.MULTILINE)


def locked_versions(lock: Path = LOCK) -> dict[str, str]:
    """Canonical package name -> the exact version the lock pins."""
    return {canonicalize_name(name): version for name, version in PIN.findall(lock.read_text())}


def declared_requirements(pyproject: Path = PYPROJECT) -> list[Requirement]:
    """Every requirement of the project and of its extras, self-references left out."""
    project = tomllib.loads(pyproject.read_text())["project"]
    texts = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        texts.extend(extra)
    requirements = [Requirement(text) for text in texts]
    return [r for r in requirements if canonicalize_name(r.name) != canonicalize_name("peftreg")]
