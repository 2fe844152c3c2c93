"""CLI habits of docker, oras and `hf` users: host references, --json, filters, offline, cache rm.

One secured registry process for the module; each test has its own cache
and config file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from peftreg.cli.main import COMMANDS, LazyGroup, cli
from tests.client.conftest import tree_bytes
from tests.conftest import ADMIN_TOKEN
from tests.fixtures.cli import CliEnv
from tests.fixtures.server import RegistryProcess, free_port, start_registry


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    process = start_registry(
        tmp_path_factory.mktemp("habits") / "home",
        {
            "PEFTREG_ANONYMOUS": "none",
            "PEFTREG_ADMIN_TOKEN": ADMIN_TOKEN,
            "PEFTREG_EMBEDDED_WORKER": "false",
        },
    )
    yield process
    process.stop()


@pytest.fixture
def env(server: RegistryProcess, tmp_path: Path) -> CliEnv:
    """The default registry is `server`, with the admin token in the environment."""
    cache = tmp_path / "cache"
    config = tmp_path / "config" / "config.json"
    return CliEnv(
        {
            "PEFTREG_URL": server.url,
            "PEFTREG_TOKEN": ADMIN_TOKEN,
            "PEFTREG_CACHE": str(cache),
            "PEFTREG_CONFIG": str(config),
            "PEFTREG_RETRIES": "0",
        },
        cache,
        config,
    )


def small_tree(root: Path, marker: str) -> Path:
    (root / "weights").mkdir(parents=True)
    (root / "adapter_config.json").write_text('{"r": 8}')
    (root / "README.md").write_text(f"# {marker}\n")
    (root / "weights" / "adapter.safetensors").write_bytes(os.urandom(4096))
    (root / "weights" / "shared.bin").write_bytes(b"shared" * 100)
    return root


def host(server: RegistryProcess) -> str:
    return f"127.0.0.1:{server.port}"


def leaf_commands() -> Iterator[tuple[str, click.Command]]:
    group = LazyGroup(name="peftreg")
    context = click.Context(cli)
    pending: list[tuple[str, click.Command]] = []
    for name in COMMANDS:
        command = group.get_command(context, name)
        assert command is not None, name
        pending.append((name, command))
    while pending:
        path, command = pending.pop()
        if isinstance(command, click.Group):
            pending += [(f"{path} {sub}", cmd) for sub, cmd in command.commands.items()]
        else:
            yield path, command


# Commands that print nothing on stdout would be exempt from --json; there are none.
PRINT_NOTHING: frozenset[str] = frozenset()


def test_every_command_has_json() -> None:
    leaves = dict(leaf_commands())
    assert {"push", "pull", "tag", "rm", "login", "jobs show", "cache verify", "cache rm"} <= set(
        leaves
    )
    missing = sorted(
        path
        for path, command in leaves.items()
        if path not in PRINT_NOTHING
        and not any("--json" in getattr(param, "opts", ()) for param in command.params)
    )
    assert missing == [], f"commands without --json: {missing}"


def test_full_reference_selects_the_registry_and_its_stored_token(
    server: RegistryProcess, env: CliEnv, tmp_path: Path
) -> None:
    source = small_tree(tmp_path / "src", "hosted")
    # login with the token on stdin, stored for the host
    logged = CliRunner().invoke(
        cli,
        ["login", host(server), "--token-stdin", "--json"],
        input=ADMIN_TOKEN + "\n",
        env=env.env,
    )
    assert logged.exit_code == 0, logged.output
    assert json.loads(logged.stdout)["registry"] == host(server)
    assert ADMIN_TOKEN not in logged.stdout
    stored = json.loads(env.config.read_text())
    assert stored["registries"][host(server)]["token"] == ADMIN_TOKEN

    # the default registry is elsewhere and no token is in the environment:
    # only the host in the reference can lead to `server` and its stored token
    elsewhere = {"PEFTREG_URL": f"http://127.0.0.1:{free_port()}", "PEFTREG_TOKEN": ""}
    ref = f"{host(server)}/acme/hosted:v1"
    pushed = env.run("push", str(source), ref, "--json", **elsewhere)
    assert pushed.exit_code == 0, pushed.output
    payload = json.loads(pushed.stdout)
    assert payload["reference"] == "acme/hosted:v1"
    assert payload["registry"] == server.url

    pulled = env.run("pull", ref, "-o", str(tmp_path / "out"), "--json", **elsewhere)
    assert pulled.exit_code == 0, pulled.output
    assert json.loads(pulled.stdout)["digest"] == payload["digest"]
    assert tree_bytes(tmp_path / "out") == tree_bytes(source)

    tagged = env.run("tag", ref, f"{host(server)}/acme/hosted:prod", "--json", **elsewhere)
    assert json.loads(tagged.stdout)["digest"] == payload["digest"]
    removed = env.run("rm", f"{host(server)}/acme/hosted:prod", "--json", **elsewhere)
    assert json.loads(removed.stdout)["untagged"] == "prod"

    # without the host the default registry is asked, and it is not there
    empty_cache = str(tmp_path / "empty-cache")
    default = env.run("pull", "acme/hosted:v1", PEFTREG_CACHE=empty_cache, **elsewhere)
    assert default.exit_code == 1
    assert "cannot reach" in default.stderr
    # another host gets no token: the stored one is never sent elsewhere
    other = env.run("pull", f"localhost:{server.port}/acme/hosted:v1", **elsewhere)
    assert other.exit_code == 1
    assert "authentication required" in other.stderr

    logout = env.run("logout", host(server), "--json")
    assert json.loads(logout.stdout) == {"registry": host(server), "logged_out": True}
    after = env.run("pull", ref, PEFTREG_CACHE=empty_cache, **elsewhere)
    assert after.exit_code == 1
    assert "authentication required" in after.stderr


def test_invalid_reference_exits_1_and_usage_errors_2(env: CliEnv) -> None:
    bad = env.run("pull", "acme/Bad:v1")
    assert bad.exit_code == 1
    assert bad.stderr.startswith("peftreg: invalid reference")
    bad_host = env.run("pull", "bad_host:1/acme/a:v1")
    assert bad_host.exit_code == 1
    assert "not a registry host" in bad_host.stderr
    assert env.run("pull").exit_code == 2
    assert env.run("pull", "acme/a:v1", "--no-such-option").exit_code == 2


def test_pull_include_exclude(env: CliEnv, tmp_path: Path) -> None:
    source = small_tree(tmp_path / "src", "filters")
    assert env.run("push", str(source), "acme/filters:v1", "-q").exit_code == 0

    only = env.run(
        "pull", "acme/filters:v1", "--include", "*.json", "--include", "README.*",
        "-o", str(tmp_path / "only"), "--json",
    )  # fmt: skip
    assert only.exit_code == 0, only.output
    titles = [item["title"] for item in json.loads(only.stdout)["files"]]
    assert sorted(titles) == ["README.md", "adapter_config.json"]
    assert sorted(tree_bytes(tmp_path / "only")) == ["README.md", "adapter_config.json"]

    skipped = env.run(
        "pull", "acme/filters:v1", "--exclude", "weights/*", "-o", str(tmp_path / "skip"), "-q"
    )
    assert skipped.exit_code == 0, skipped.output
    assert sorted(tree_bytes(tmp_path / "skip")) == ["README.md", "adapter_config.json"]

    # a full pull afterwards has every file, whatever the cache held
    full = env.run("pull", "acme/filters:v1", "-o", str(tmp_path / "full"), "-q")
    assert full.exit_code == 0, full.output
    assert tree_bytes(tmp_path / "full") == tree_bytes(source)

    nothing = env.run("pull", "acme/filters:v1", "--include", "*.gguf")
    assert nothing.exit_code == 1
    assert "no file matches" in nothing.stderr


def test_offline_fallback_serves_the_cache_with_a_warning(env: CliEnv, tmp_path: Path) -> None:
    source = small_tree(tmp_path / "src", "offline")
    assert env.run("push", str(source), "acme/offline:v1", "-q").exit_code == 0
    assert env.run("pull", "acme/offline:v1", "-q").exit_code == 0

    unreachable = {"PEFTREG_URL": f"http://127.0.0.1:{free_port()}"}
    served = env.run("pull", "acme/offline:v1", "--json", **unreachable)
    assert served.exit_code == 0, served.stderr
    assert "warning: registry unreachable" in served.stderr
    payload = json.loads(served.stdout)
    assert payload["from_cache_offline"] is True
    assert tree_bytes(Path(payload["path"])) == tree_bytes(source)

    never_pulled = env.run("pull", "acme/offline:v2", **unreachable)
    assert never_pulled.exit_code == 1
    assert "cannot reach" in never_pulled.stderr

    # a cached reference whose files were only partly pulled cannot stand in
    other = small_tree(tmp_path / "other", "partial")
    assert env.run("push", str(other), "acme/offline:partial", "-q").exit_code == 0
    assert env.run("pull", "acme/offline:partial", "--include", "*.json", "-q").exit_code == 0
    partial = env.run("pull", "acme/offline:partial", **unreachable)
    assert partial.exit_code == 1
    assert "cannot reach" in partial.stderr
    assert "the cache cannot stand in" in partial.stderr

    # a cached manifest that no longer matches its digest cannot be checked: no fallback
    manifest = env.cache / "manifests" / "sha256" / payload["digest"].split(":")[1]
    manifest.chmod(0o644)
    manifest.write_bytes(manifest.read_bytes() + b" ")
    tampered = env.run("pull", "acme/offline:v1", **unreachable)
    assert tampered.exit_code == 1
    assert "cannot reach" in tampered.stderr


def test_cache_rm_forgets_one_reference(env: CliEnv, tmp_path: Path) -> None:
    first = small_tree(tmp_path / "one", "one")
    second = small_tree(tmp_path / "two", "two")
    (second / "weights" / "shared.bin").write_bytes((first / "weights" / "shared.bin").read_bytes())
    assert env.run("push", str(first), "acme/cached:v1", "-q").exit_code == 0
    assert env.run("push", str(second), "acme/cached:v2", "-q").exit_code == 0
    assert env.run("pull", "acme/cached:v1", "-q").exit_code == 0
    assert env.run("pull", "acme/cached:v2", "-q").exit_code == 0

    removed = env.run("cache", "rm", "acme/cached:v1", "--json")
    assert removed.exit_code == 0, removed.output
    result = json.loads(removed.stdout)
    assert result["refs"] == ["acme/cached:v1"]
    assert result["blobs"] == 2  # its README and safetensors; config and shared.bin stay
    assert result["freed_bytes"] > 4096

    listed = json.loads(env.run("cache", "ls", "--json").stdout)
    assert [ref["tag"] for ref in listed["refs"]] == ["v2"]
    offline = env.run("pull", "acme/cached:v2", "--offline", "-o", str(tmp_path / "v2"), "-q")
    assert offline.exit_code == 0, offline.output
    assert tree_bytes(tmp_path / "v2") == tree_bytes(second)
    assert env.run("pull", "acme/cached:v1", "--offline").exit_code == 1
    gone = env.run("cache", "rm", "acme/cached:v1")
    assert gone.exit_code == 1
    assert "not in the cache" in gone.stderr

    verified = env.run("cache", "verify", "--json")
    assert json.loads(verified.stdout)["ok"] is True
    pruned = env.run("cache", "prune", "--json")
    assert json.loads(pruned.stdout)["all"] is False
