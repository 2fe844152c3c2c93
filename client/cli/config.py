"""Where the CLI keeps the registry URL and token, and how the environment overrides it.

The file is `PEFTREG_CONFIG`, by default `<user config dir>/peftreg/config.json`,
written with mode 0600. `PEFTREG_URL` and `PEFTREG_TOKEN` win over it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs

from peftreg.sdk.client import DEFAULT_URL

ENV_CONFIG = "PEFTREG_CONFIG"
ENV_URL = "PEFTREG_URL"
ENV_TOKEN = "PEFTREG_TOKEN"  # noqa: S105 - a variable name, not a secret


@dataclass(frozen=True)
class Settings:
    url: str
    token: str | None


def config_path() -> Path:
    configured = os.environ.get(ENV_CONFIG)
    if configured:
        return Path(configured).expanduser()
    return Path(platformdirs.user_config_dir("peftreg")) / "config.json"


def load_file() -> dict[str, Any]:
    try:
        data = json.loads(config_path().read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_file(data: dict[str, Any]) -> Path:
    """Write the config atomically, readable by its owner only."""
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
    os.chmod(staging, 0o600)
    os.replace(staging, path)
    return path


def resolve() -> Settings:
    stored = load_file()
    url = os.environ.get(ENV_URL) or stored.get("url") or DEFAULT_URL
    token = os.environ.get(ENV_TOKEN) or stored.get("token") or None
    return Settings(url=str(url), token=str(token) if token else None)
