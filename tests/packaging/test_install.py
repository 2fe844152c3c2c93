"""The wheel as users install it: one import name, and each role's extra in a fresh
virtual environment running real commands (the lock's versions, as constraints)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
from peft import LoraConfig

from tests.adapters.tiny_models import tiny_llama
from tests.fixtures.server import RegistryProcess, clean_environment
from tests.merge.builders import (
    directory_tensors,
    max_difference,
    peft_merged,
    save_adapter,
    save_base,
)
from tests.packaging.conftest import InstallRole


def run(
    bin_dir: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(bin_dir / "peftreg"), *args],
        capture_output=True,
        check=False,
        text=True,
        env=env or clean_environment(),
        timeout=120,
    )


def importable(bin_dir: Path, module: str) -> bool:
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([str(bin_dir / "python"), "-c", probe], check=False).returncode == 0


def test_the_wheel_installs_one_top_level_name(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {
        "peftreg",
        f"{wheel.name.split('-py')[0]}.dist-info",
    }
    for required in (
        "peftreg/registry/app.py",
        "peftreg/registry/db/migrate.py",
        "peftreg/migrations/__init__.py",
        "peftreg/migrations/env.py",
        "peftreg/migrations/script.py.mako",
        "peftreg/migrations/versions/0001_initial.py",
        "peftreg/migrations/versions/0004_gc.py",
        "peftreg/registry/web/templates/base.html",
        "peftreg/registry/web/templates/version.html",
        "peftreg/registry/web/static/ui.css",
        "peftreg/registry/web/static/job.js",
    ):
        assert required in names, f"{required} missing from {wheel.name}"
    assert "peftreg/hotswap/host.py" in names
    assert not any(name.startswith(("peftreg/client/", "peftreg/peftreg/")) for name in names)


def test_base_install_pushes_and_pulls_without_the_service_or_torch(
    role_environment: InstallRole, registry_server: RegistryProcess, tmp_path: Path
) -> None:
    bin_dir = role_environment("")
    for heavy in ("torch", "fastapi", "sqlalchemy", "boto3", "numpy", "safetensors"):
        assert not importable(bin_dir, heavy), heavy
    env = {**clean_environment(), "PEFTREG_URL": registry_server.url, "HOME": str(tmp_path)}
    env["PEFTREG_CACHE"] = str(tmp_path / "cache")
    env["PEFTREG_CONFIG"] = str(tmp_path / "config.json")
    source = tmp_path / "notes.txt"
    source.write_bytes(b"adapter card\n" * 1000)
    pushed = run(bin_dir, "push", str(source), "acme/wheel:v1", env=env)
    assert pushed.returncode == 0, pushed.stderr
    pulled = run(bin_dir, "pull", "acme/wheel:v1", "-o", str(tmp_path / "out"), env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert (tmp_path / "out" / "notes.txt").read_bytes() == source.read_bytes()
    listed = run(bin_dir, "ls", "acme", "--json", env=env)
    assert listed.returncode == 0
    assert "acme/wheel" in listed.stdout


def test_base_install_names_the_missing_extra_in_one_line(
    role_environment: InstallRole, tmp_path: Path
) -> None:
    bin_dir = role_environment("")
    env = {**clean_environment(), "PEFTREG_HOME": str(tmp_path / "home")}
    cases = {
        ("serve",): "the 'server' extra: pip install 'peftreg[server]'",
        ("db", "upgrade"): "the 'server' extra: pip install 'peftreg[server]'",
        ("fsck",): "the 'server' extra: pip install 'peftreg[server]'",
        ("worker",): "the 'server' extra: pip install 'peftreg[server]'",
        ("merge", str(tmp_path), "--base", str(tmp_path), "-o", str(tmp_path / "m")): "torch",
    }
    for args, expected in cases.items():
        result = run(bin_dir, *args, env=env)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert "Traceback" not in result.stderr, (args, result.stderr)
        assert len(lines) == 1, (args, result.stderr)
        assert lines[0].startswith(f"peftreg: peftreg {args[0]} needs "), lines
        assert expected in lines[0], lines
    assert run(bin_dir, "--help", env=env).returncode == 0


def test_server_install_serves_on_postgresql_drivers_without_torch(
    role_environment: InstallRole, tmp_path: Path
) -> None:
    bin_dir = role_environment("server")
    assert importable(bin_dir, "psycopg")
    assert importable(bin_dir, "boto3")
    assert not importable(bin_dir, "torch")
    server = RegistryProcess(
        home=tmp_path / "home", env=clean_environment(), command=[str(bin_dir / "peftreg")]
    ).start()
    env = {**clean_environment(), "PEFTREG_URL": server.url, "HOME": str(tmp_path)}
    env["PEFTREG_CACHE"] = str(tmp_path / "cache")
    env["PEFTREG_CONFIG"] = str(tmp_path / "config.json")
    client = [sys.executable, "-m", "peftreg.cli.main"]
    source = tmp_path / "notes.txt"
    source.write_bytes(b"served by the server extra\n" * 100)
    try:
        pushed = subprocess.run(
            [*client, "push", str(source), "acme/plain:v1"], check=False, env=env
        )
        assert pushed.returncode == 0
        out = tmp_path / "out"
        pulled = subprocess.run(
            [*client, "pull", "acme/plain:v1", "-o", str(out)], check=False, env=env
        )
        assert pulled.returncode == 0
        assert (out / "notes.txt").read_bytes() == source.read_bytes()
        # The web UI's templates and assets come from the wheel (loopback: anonymous admin).
        listed = httpx.get(f"{server.url}/ui/", timeout=10)
        assert listed.status_code == 200
        assert "acme/plain" in listed.text
        stylesheet = httpx.get(f"{server.url}/ui/static/ui.css", timeout=10)
        assert stylesheet.status_code == 200
        assert "text/css" in stylesheet.headers["content-type"]
    finally:
        server.stop()
    merge = run(bin_dir, "merge", str(tmp_path), "--base", str(tmp_path), "-o", str(tmp_path / "m"))
    assert merge.returncode == 1
    assert "needs torch" in merge.stderr


def test_hotswap_install_merges_locally_without_the_service(
    role_environment: InstallRole, tmp_path: Path
) -> None:
    """`peftreg[hotswap]` plus the user's torch: local merge gives peft's weights, the
    SDK imports, and the service names its extra."""
    bin_dir = role_environment("hotswap+torch")
    assert not importable(bin_dir, "fastapi")
    assert not importable(bin_dir, "transformers")
    base = save_base(tiny_llama(), tmp_path / "base")
    adapter = save_adapter(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "a")
    out = tmp_path / "merged"
    merged = run(bin_dir, "merge", str(adapter), "--base", str(base), "-o", str(out))
    assert merged.returncode == 0, merged.stderr
    want = peft_merged(tiny_llama(), adapter).state_dict()
    got = directory_tensors(out)
    assert max_difference(got, want) <= 1e-6
    host = [str(bin_dir / "python"), "-c", "from peftreg.hotswap import AdapterHost, HostConfig"]
    assert subprocess.run(host, check=False).returncode == 0
    serve = run(bin_dir, "serve")
    assert serve.returncode == 1
    (line,) = serve.stderr.strip().splitlines()
    assert line.startswith("peftreg: peftreg serve needs ")
    assert line.endswith(", from the 'server' extra: pip install 'peftreg[server]'")
