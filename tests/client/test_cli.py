"""The CLI end to end against a real registry process."""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from pathlib import Path

from peftreg import Client
from peftreg.digest import Digest
from peftreg.manifest import EMPTY_JSON, OCI_MANIFEST, TITLE_ANNOTATION, canonical_json
from tests.client.conftest import make_tree, tree_bytes
from tests.conftest import ADMIN_TOKEN
from tests.fixtures.cli import CliEnv
from tests.fixtures.server import RegistryProcess


def test_push_then_pull_directory_is_byte_identical(cli_env: CliEnv, tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src")
    pushed = cli_env.run("push", str(source), "acme/demo:v1", "-q")
    assert pushed.exit_code == 0, pushed.output
    digest = pushed.stdout.split()[-1]
    Digest.parse(digest)

    pulled = cli_env.run("pull", "acme/demo:v1", "-o", str(tmp_path / "out"), "-q")
    assert pulled.exit_code == 0, pulled.output
    assert tree_bytes(tmp_path / "out") == tree_bytes(source)
    assert (cli_env.cache / "refs" / "acme" / "demo" / "_tags" / "v1").read_text() == digest
    assert not list(tmp_path.glob(".out.peftreg-*"))

    # Pushing again uploads nothing; pulling by digest hits the cache.
    again = cli_env.run("push", str(source), "acme/demo:latest")
    assert "0 uploaded" in again.stderr
    by_digest = cli_env.run("pull", f"acme/demo@{digest}", "-q")
    assert by_digest.exit_code == 0, by_digest.output
    assert tree_bytes(Path(by_digest.stdout.strip())) == tree_bytes(source)

    # A non-empty output needs --force, and is then replaced whole.
    refused = cli_env.run("pull", "acme/demo:v1", "-o", str(tmp_path / "out"))
    assert refused.exit_code == 1
    (tmp_path / "out" / "stray").write_text("x")
    forced = cli_env.run("pull", "acme/demo:v1", "-o", str(tmp_path / "out"), "--force", "-q")
    assert forced.exit_code == 0, forced.output
    assert tree_bytes(tmp_path / "out") == tree_bytes(source)


def test_listing_commands_and_tags(cli_env: CliEnv, tmp_path: Path) -> None:
    source = tmp_path / "model.bin"
    source.write_bytes(b"weights")
    assert cli_env.run("push", str(source), "acme/nlp/bot:v1", "-q").exit_code == 0

    repos = json.loads(cli_env.run("ls", "acme", "--json").stdout)
    assert [r["name"] for r in repos] == ["acme/nlp/bot"]
    assert json.loads(cli_env.run("ls", "other", "--json").stdout) == []

    shown = json.loads(cli_env.run("show", "acme/nlp/bot:v1", "--json").stdout)
    assert shown["tags"] == ["v1"]
    assert shown["manifest"]["layers"][0]["annotations"][TITLE_ANNOTATION] == "model.bin"
    assert "model.bin" in cli_env.run("show", "acme/nlp/bot:v1").stdout

    tagged = cli_env.run("tag", "acme/nlp/bot:v1", "acme/nlp/bot:prod")
    assert tagged.exit_code == 0, tagged.output
    copied = cli_env.run("tag", "acme/nlp/bot:v1", "acme/other:prod")
    assert copied.exit_code == 0, copied.output
    history = json.loads(cli_env.run("history", "acme/nlp/bot:prod", "--json").stdout)
    assert history[0]["to_digest"] == shown["digest"]

    assert cli_env.run("rm", "acme/nlp/bot:prod").exit_code == 0
    in_use = cli_env.subprocess("rm", f"acme/nlp/bot@{shown['digest']}")
    assert in_use.returncode == 1
    assert in_use.stderr.count("\n") == 1
    assert "request id" in in_use.stderr
    immutable = cli_env.subprocess("rm", f"acme/nlp/bot@{shown['digest']}", "--force")
    assert immutable.returncode == 1
    assert "immutable" in immutable.stderr
    with Client(cli_env.env["PEFTREG_URL"]) as client:
        client.set_policy("acme/nlp/bot", [])
    forced = cli_env.run("rm", f"acme/nlp/bot@{shown['digest']}", "--force")
    assert forced.exit_code == 0, forced.output
    assert "v1" in forced.stdout


def test_user_errors_are_one_line_without_traceback(cli_env: CliEnv) -> None:
    bad = cli_env.subprocess("pull", "Not A Reference!")
    assert bad.returncode == 1
    assert bad.stderr.startswith("peftreg: invalid reference")
    assert bad.stderr.count("\n") == 1
    assert "Traceback" not in bad.stderr

    missing = cli_env.subprocess("show", "acme/nothing:v1")
    assert missing.returncode == 1
    assert missing.stderr.startswith("peftreg: ")
    assert "(request id " in missing.stderr
    assert missing.stderr.count("\n") == 1
    assert "Traceback" not in missing.stderr


def test_unreachable_registry_is_one_line(make_env: Callable[[str], CliEnv]) -> None:
    env = make_env("http://127.0.0.1:9")
    result = env.subprocess("ls")
    assert result.returncode == 1
    assert result.stderr.startswith("peftreg: cannot reach")
    assert result.stderr.count("\n") == 1


def test_login_file_is_private_and_used(
    secured_server: RegistryProcess, make_env: Callable[[str], CliEnv]
) -> None:
    env = make_env(secured_server.url)
    del env.env["PEFTREG_URL"]
    denied = env.run("ls")
    assert denied.exit_code == 1  # default URL, nothing there or no token

    wrong = env.run("login", secured_server.url, "--token", "wrong")
    assert wrong.exit_code == 1
    assert not env.config.exists()

    ok = env.run("login", secured_server.url, "--token", ADMIN_TOKEN)
    assert ok.exit_code == 0, ok.output
    assert stat.S_IMODE(env.config.stat().st_mode) == 0o600
    host = secured_server.url.removeprefix("http://")
    assert json.loads(env.config.read_text()) == {
        "url": secured_server.url,
        "token": ADMIN_TOKEN,
        "registries": {host: {"url": secured_server.url, "token": ADMIN_TOKEN}},
    }
    assert env.run("ls", "--json").exit_code == 0

    created = json.loads(
        env.run("token", "create", "ci", "--grant", "acme/*:write", "--json").stdout
    )
    listed = json.loads(env.run("token", "ls", "--json").stdout)
    assert created["id"] in [row["id"] for row in listed]
    assert env.run("token", "revoke", created["id"]).exit_code == 0

    assert env.run("logout").exit_code == 0
    assert "token" not in json.loads(env.config.read_text())
    assert "token" not in json.loads(env.config.read_text())["registries"][host]
    assert stat.S_IMODE(env.config.stat().st_mode) == 0o600
    assert env.run("ls").exit_code == 1


def test_prompted_login(secured_server: RegistryProcess, make_env: Callable[[str], CliEnv]) -> None:
    env = make_env(secured_server.url)
    from click.testing import CliRunner

    from peftreg.cli.main import cli

    result = CliRunner().invoke(
        cli, ["login", secured_server.url], input=ADMIN_TOKEN + "\n", env=env.env
    )
    assert result.exit_code == 0, result.output
    assert ADMIN_TOKEN not in result.stdout
    assert json.loads(env.config.read_text())["token"] == ADMIN_TOKEN


def test_layer_titles_escaping_the_directory_are_refused(
    cli_env: CliEnv, registry_server: RegistryProcess, tmp_path: Path
) -> None:
    with Client(registry_server.url) as client:
        client.upload_blob("acme/evil", b"{}")
        payload = b"owned"
        client.upload_blob("acme/evil", payload)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": EMPTY_JSON,
                "digest": str(Digest.of_bytes(b"{}")),
                "size": 2,
            },
            "layers": [
                {
                    "mediaType": "application/octet-stream",
                    "digest": str(Digest.of_bytes(payload)),
                    "size": len(payload),
                    "annotations": {TITLE_ANNOTATION: "../escaped.txt"},
                }
            ],
        }
        client.put_manifest("acme/evil:v1", canonical_json(manifest))
    result = cli_env.subprocess("pull", "acme/evil:v1", "-o", str(tmp_path / "out" / "x"))
    assert result.returncode == 1
    assert "escapes" in result.stderr
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.rglob("escaped.txt"))
