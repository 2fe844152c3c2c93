"""Resumable, verified, cached pulls against a real registry (and a real proxy)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from peftreg import Client
from peftreg.cache import Cache
from peftreg.digest import Digest
from peftreg.sdk.errors import Forbidden
from tests.client.conftest import make_tree, tree_bytes
from tests.client.proxy import cutting_proxy
from tests.fixtures.cli import CliEnv
from tests.fixtures.server import RegistryProcess

MiB = 1024 * 1024
EMPTY_CONFIG_DIGEST = Digest.of_bytes(b"{}")


def _blob_file(server: RegistryProcess, digest: Digest) -> Path:
    return server.home / "storage" / "blobs" / digest.algorithm / digest.hex[:2] / digest.hex


def _flip_byte(path: Path, offset: int = 1000) -> None:
    os.chmod(path, 0o644)
    with path.open("r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("size", [30 * MiB, 80 * MiB], ids=["30MiB", "80MiB"])
def test_interrupted_pull_resumes_with_only_the_remainder(
    registry_server: RegistryProcess,
    make_env: Callable[[str], CliEnv],
    tmp_path: Path,
    size: int,
) -> None:
    data = os.urandom(size)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "weights.bin").write_bytes(data)
    with Client(registry_server.url) as client:
        client.push(tmp_path / "src", "acme/big:v1")

    cut = size // 2
    with cutting_proxy(registry_server.port, cut_after=cut) as proxy:
        env = make_env(proxy.url)
        first = env.run("pull", "acme/big:v1", "-o", str(tmp_path / "out"), "-q")
        assert first.exit_code == 1, first.output
        assert "interrupted" in first.stderr or "cannot reach" in first.stderr
        assert not (tmp_path / "out").exists()
        partial = list((env.cache / "blobs" / "sha256").glob("*.incomplete"))
        assert len(partial) == 1

        proxy.reset()
        second = env.run("pull", "acme/big:v1", "-o", str(tmp_path / "out"), "-q")
        assert second.exit_code == 0, second.output
        assert (tmp_path / "out" / "weights.bin").read_bytes() == data
        assert proxy.ranges, "the resumed pull must ask for a range"
        assert all(not r.startswith("bytes=0-") for r in proxy.ranges)
        # Only the remainder travelled (plus headers and at most a few unsaved MiB).
        assert proxy.downstream < size - cut + 9 * MiB
        assert not list((env.cache / "blobs" / "sha256").glob("*.incomplete*"))


# By default the body is sent by the kernel (sendfile); a session with a transport of its
# own (or a proxy, or https) streams it through httpx. Both resume the same way.
@pytest.mark.parametrize("via", ["sendfile", "httpx"])
def test_interrupted_push_continues_from_the_server_offset(
    registry_server: RegistryProcess, tmp_path: Path, via: str
) -> None:
    size, cut = 48 * MiB, 20 * MiB
    data = os.urandom(size)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "weights.bin").write_bytes(data)
    transport = httpx.HTTPTransport() if via == "httpx" else None
    with cutting_proxy(registry_server.port, cut_upstream_after=cut) as proxy:
        with Client(proxy.url, transport=transport) as client:
            client.push(tmp_path / "src", "acme/resumed:v1")
        status_checks = [
            r for r in proxy.requests if r.startswith("GET /v2/acme/resumed/blobs/uploads/")
        ]
        assert status_checks, "after the cut the client must ask the server for its offset"
        # The chunk cut short was continued, not sent again from its start or from zero.
        assert proxy.upstream < size + 2 * MiB
    with Client(registry_server.url) as client:
        pulled = client.pull("acme/resumed:v1", tmp_path / "out")
    assert (tmp_path / "out" / "weights.bin").read_bytes() == data
    assert pulled is not None


# 3 MiB is read through httpx; 12 MiB is spliced from the socket into the file and hashed
# from there (peftreg.splice): either way, a wrong byte is caught.
@pytest.mark.parametrize("size", [3 * MiB, 12 * MiB], ids=["read", "spliced"])
def test_corrupted_server_blob_fails_and_leaves_nothing(
    registry_server: RegistryProcess, cli_env: CliEnv, tmp_path: Path, size: int
) -> None:
    source = make_tree(tmp_path / "src", big=size)
    with Client(registry_server.url) as client:
        result = client.push(source, f"acme/bad-{size}:v1")
    target = next(f for f in result.files if f.size == size)
    _flip_byte(_blob_file(registry_server, target.digest))

    pulled = cli_env.subprocess("pull", f"acme/bad-{size}:v1", "-o", str(tmp_path / "out"))
    assert pulled.returncode == 1
    assert "digest mismatch" in pulled.stderr
    assert pulled.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()
    blobs = cli_env.cache / "blobs" / "sha256"
    assert not list(blobs.glob(f"{target.digest.hex}*"))


def test_cache_verify_names_a_corrupted_blob(cli_env: CliEnv, tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src", big=MiB)
    assert cli_env.run("push", str(source), "acme/c:v1", "-q").exit_code == 0
    assert cli_env.run("pull", "acme/c:v1", "-q").exit_code == 0
    assert cli_env.run("cache", "verify").exit_code == 0

    victim = Digest.of_bytes((source / "weights" / "adapter.safetensors").read_bytes())
    _flip_byte(cli_env.cache / "blobs" / "sha256" / victim.hex)
    result = cli_env.run("cache", "verify")
    assert result.exit_code == 1
    assert victim.hex in result.stdout
    assert "corrupted" in result.stderr

    listing = cli_env.run("cache", "ls", "--json")
    assert listing.exit_code == 0
    assert "acme/c" in listing.stdout
    assert cli_env.run("cache", "prune", "--all").exit_code == 0
    assert not (cli_env.cache / "blobs").exists()


def test_offline_mode_uses_the_cache_only(
    registry_server: RegistryProcess, cli_env: CliEnv, tmp_path: Path
) -> None:
    source = make_tree(tmp_path / "src", big=2 * MiB)
    assert cli_env.run("push", str(source), "acme/off:v1", "-q").exit_code == 0
    assert cli_env.run("pull", "acme/off:v1", "-q").exit_code == 0
    registry_server.stop()

    ok = cli_env.run("pull", "acme/off:v1", "-o", str(tmp_path / "a"), PEFTREG_OFFLINE="1")
    assert ok.exit_code == 0, ok.output
    assert tree_bytes(tmp_path / "a") == tree_bytes(source)

    never = cli_env.subprocess("pull", "acme/off:v2", "--offline", "-o", str(tmp_path / "b"))
    assert never.returncode == 1
    assert "offline" in never.stderr
    assert not (tmp_path / "b").exists()

    victim = Digest.of_bytes((source / "README.md").read_bytes())
    (cli_env.cache / "blobs" / "sha256" / victim.hex).unlink()
    missing = cli_env.subprocess(
        "pull", "acme/off:v1", "-o", str(tmp_path / "b"), PEFTREG_OFFLINE="1"
    )
    assert missing.returncode == 1
    assert f"blob {victim}" in missing.stderr
    assert "not in the cache" in missing.stderr
    assert missing.stderr.count("\n") == 1
    assert not (tmp_path / "b").exists()
    assert not list(tmp_path.glob(".b.peftreg-*"))


def test_eight_processes_download_a_200mb_artifact_once(
    registry_server: RegistryProcess, make_env: Callable[[str], CliEnv], tmp_path: Path
) -> None:
    size = 200 * MiB
    block = os.urandom(MiB)
    (tmp_path / "src").mkdir()
    with (tmp_path / "src" / "model.bin").open("wb") as handle:
        for index in range(size // MiB):
            handle.write(index.to_bytes(8, "big") + block[8:])
    expected = hashlib.sha256((tmp_path / "src" / "model.bin").read_bytes()).hexdigest()
    with Client(registry_server.url) as client:
        client.push(tmp_path / "src", "acme/large:v1")

    with cutting_proxy(registry_server.port) as proxy:
        env = make_env(proxy.url)
        base = {k: v for k, v in os.environ.items() if not k.startswith("PEFTREG_")}
        processes = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "peftreg.cli.main",
                    "pull",
                    "acme/large:v1",
                    "-q",
                    "-o",
                    str(tmp_path / f"out{index}"),
                ],
                env={**base, **env.env},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for index in range(8)
        ]
        for process in processes:
            _out, err = process.communicate(timeout=240)
            assert process.returncode == 0, err.decode()
        assert size <= proxy.downstream < size + 4 * MiB

    for index in range(8):
        with (tmp_path / f"out{index}" / "model.bin").open("rb") as handle:
            assert hashlib.file_digest(handle, "sha256").hexdigest() == expected


def test_cached_refs_of_nested_repositories_do_not_collide(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    first, second = Digest.of_bytes(b"a"), Digest.of_bytes(b"b")
    cache.set_ref("acme/bot", "c", first)
    cache.set_ref("acme/bot/c", "v1", second)
    assert cache.get_ref("acme/bot", "c") == first
    assert cache.get_ref("acme/bot/c", "v1") == second
    assert {(r.repository, r.tag) for r in cache.iter_refs()} == {
        ("acme/bot", "c"),
        ("acme/bot/c", "v1"),
    }


def test_the_sdk_takes_its_cache_and_paths_as_strings(
    registry_server: RegistryProcess, tmp_path: Path
) -> None:
    source = tmp_path / "weights.bin"
    source.write_bytes(os.urandom(1000))
    with Client(registry_server.url, cache=str(tmp_path / "cache")) as client:
        client.push(str(source), "acme/strings:v1")
        pulled = client.pull("acme/strings:v1", output=str(tmp_path / "out"))
    assert (pulled.path / "weights.bin").read_bytes() == source.read_bytes()
    assert Cache(tmp_path / "cache").has_blob(Digest.of_bytes(source.read_bytes()), 1000)


class RefusingConfigTransport(httpx.BaseTransport):
    """The real transport, except that the upload of the empty config blob is refused."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.sent: list[tuple[str, str]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append((request.method, request.url.path))
        if request.method == "POST" and request.url.params.get("digest") == str(
            EMPTY_CONFIG_DIGEST
        ):
            body = {"errors": [{"code": "DENIED", "message": "no config blobs today"}]}
            return httpx.Response(403, json=body)
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


def test_a_refused_config_blob_fails_the_push_before_its_manifest(
    registry_server: RegistryProcess, tmp_path: Path
) -> None:
    """The config blob goes up beside the files; its failure still fails the push, and no
    manifest is put."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "weights.bin").write_bytes(os.urandom(3 * MiB))
    transport = RefusingConfigTransport()
    with (
        Client(registry_server.url, transport=transport) as client,
        pytest.raises(Forbidden, match="no config blobs today"),
    ):
        client.push(tmp_path / "src", "acme/configless:v1")
    assert ("PUT", "/v2/acme/configless/manifests/v1") not in transport.sent
    manifest = httpx.head(f"{registry_server.url}/v2/acme/configless/manifests/v1")
    assert manifest.status_code == 404
