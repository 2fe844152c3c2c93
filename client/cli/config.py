"""Where the CLI keeps registry URLs and tokens, and how the environment overrides them.

The file is `PEFTREG_CONFIG`, by default `<user config dir>/peftreg/config.json`,
written with mode 0600:

    {"url": <default registry>, "token": <its token>,
     "registries": {"<host[:port]>": {"url": ..., "token": ...}}}

A reference naming a host (`127.0.0.1:8750/acme/bot:v1`) selects that
registry and the token stored for it; others use the default registry.
`PEFTREG_URL` and `PEFTREG_TOKEN` win over the file for the default registry
(the environment's token is never sent to another host).
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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


def host_of(url: str) -> str:
    """`host[:port]` of a registry URL."""
    return urlsplit(url).netloc


def is_loopback_host(host: str) -> bool:
    name = urlsplit(f"//{host}").hostname or host
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def url_for(text: str) -> str:
    """A registry URL from a URL or a bare host (http on loopback, https elsewhere)."""
    if "://" in text:
        return text.rstrip("/")
    scheme = "http" if is_loopback_host(text) else "https"
    return f"{scheme}://{text.rstrip('/')}"


def stored_registries(stored: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Per host: its URL and token, the default registry's included."""
    found: dict[str, dict[str, str]] = {}
    registries = stored.get("registries")
    if isinstance(registries, dict):
        for host, entry in registries.items():
            if isinstance(host, str) and isinstance(entry, dict):
                found[host] = {k: str(v) for k, v in entry.items() if isinstance(v, str)}
    default_url = stored.get("url")
    if isinstance(default_url, str) and stored.get("token"):
        entry = found.setdefault(host_of(default_url), {"url": default_url})
        entry.setdefault("token", str(stored["token"]))
    return found


def resolve(registry: str | None = None) -> Settings:
    """URL and token of `registry` (a host), or of the default registry."""
    stored = load_file()
    known = stored_registries(stored)
    default_url = str(os.environ.get(ENV_URL) or stored.get("url") or DEFAULT_URL).rstrip("/")
    env_token = os.environ.get(ENV_TOKEN) or None
    if registry is None or registry == host_of(default_url):
        token = env_token or known.get(host_of(default_url), {}).get("token")
        return Settings(url=default_url, token=token or None)
    entry = known.get(registry, {})
    return Settings(url=entry.get("url") or url_for(registry), token=entry.get("token") or None)


def remember(data: dict[str, Any], url: str, token: str | None) -> dict[str, Any]:
    """The config with `url` as default registry and its token stored per host."""
    found = data.get("registries")
    registries: dict[str, Any] = found if isinstance(found, dict) else {}
    entry: dict[str, str] = {"url": url}
    if token:
        entry["token"] = token
    data["registries"] = {**registries, host_of(url): entry}
    data["url"] = url
    if token:
        data["token"] = token
    else:
        data.pop("token", None)
    return data


def forget(data: dict[str, Any], host: str) -> bool:
    """Drop the token stored for `host`; whether there was one."""
    had = False
    registries = data.get("registries")
    if isinstance(registries, dict) and isinstance(registries.get(host), dict):
        had = registries[host].pop("token", None) is not None
    if host == host_of(str(data.get("url") or DEFAULT_URL)):
        had = data.pop("token", None) is not None or had
    return had
