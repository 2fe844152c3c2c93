"""Acceptance: skopeo, the docker CLI and oras-py against a real `peftreg serve` needing tokens.

skopeo (Debian package `skopeo`) copies in and out of an OCI layout, inspects,
lists tags and deletes by tag and by digest, authenticating with `--creds`
(Basic credentials exchanged at the Bearer realm) or `--registry-token`.
`docker manifest inspect` needs no daemon. oras-py pushes a directory layer as
the oras CLI writes it (tar+gzip, `io.deis.oras.content.unpack: true`), which
`peftreg pull` unpacks, and a referrer that the referrers API lists.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import oras.client
import oras.oci
import oras.utils
import pytest
from click.testing import CliRunner

from peftreg import Client
from peftreg.cli.main import cli
from tests.conftest import ADMIN_TOKEN
from tests.fixtures.server import RegistryProcess, start_registry

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


@dataclass(frozen=True)
class Registry:
    server: RegistryProcess
    reader: str  # a peftreg token: read on acme/*
    source_digest: str  # acme/src:latest, pushed by peftreg

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def docker(self, path: str) -> str:
        return f"docker://{self.host}/{path}"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    home = tmp_path_factory.mktemp("oci-clients")
    server = start_registry(
        home / "home",
        {
            "PEFTREG_ANONYMOUS": "none",
            "PEFTREG_ADMIN_TOKEN": ADMIN_TOKEN,
            "PEFTREG_EMBEDDED_WORKER": "false",
        },
    )
    try:
        source = home / "src"
        source.mkdir()
        (source / "notes.md").write_text("# notes\n")
        (source / "weights.dat").write_bytes(os.urandom(64 * 1024))
        with Client(server.url, ADMIN_TOKEN, cache=home / "cache") as client:
            pushed = client.push(source, "acme/src:latest")
            reader = client.create_token("reader", [("acme/*", "read")]).token
        yield Registry(server, reader, str(pushed.digest))
    finally:
        server.stop()


def skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["skopeo", "--insecure-policy", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def creds(token: str) -> str:
    return f"ci-robot:{token}"


def token_requests(registry: Registry) -> float:
    """How many `/token` requests the registry answered (its own HTTP metrics)."""
    text = httpx.get(f"{registry.server.url}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("http_requests_total{") and 'route="/token"' in line
    )


def tags(registry: Registry, repository: str) -> list[str]:
    response = httpx.get(f"{registry.server.url}/v2/{repository}/tags/list", headers=ADMIN)
    return list(response.json()["tags"]) if response.status_code == 200 else []


def test_skopeo_copy_inspect_list_tags_and_delete(registry: Registry, tmp_path: Path) -> None:
    layout = f"oci:{tmp_path / 'layout'}:latest"
    before = token_requests(registry)
    out = skopeo(
        "copy", "--src-tls-verify=false", "--src-creds", creds(ADMIN_TOKEN),
        registry.docker("acme/src:latest"), layout,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert token_requests(registry) > before  # --creds went through the Bearer realm

    for target in ("acme/copy:latest", "acme/copy:dev", "acme/release:v1"):
        copied = skopeo(
            "copy", "--dest-tls-verify=false", "--dest-registry-token", ADMIN_TOKEN,
            layout, registry.docker(target),
        )  # fmt: skip
        assert copied.returncode == 0, copied.stderr

    raw = skopeo(
        "inspect", "--raw", "--tls-verify=false", "--creds", creds(registry.reader),
        registry.docker("acme/copy:latest"),
    )  # fmt: skip
    assert raw.returncode == 0, raw.stderr
    assert "sha256:" + hashlib.sha256(raw.stdout.encode()).hexdigest() == registry.source_digest
    listed = skopeo(
        "list-tags", "--tls-verify=false", "--creds", creds(registry.reader),
        registry.docker("acme/copy"),
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert sorted(json.loads(listed.stdout)["Tags"]) == ["dev", "latest"]

    # a read token cannot delete: refused, nothing changes
    refused = skopeo(
        "delete", "--tls-verify=false", "--creds", creds(registry.reader),
        registry.docker("acme/copy:dev"),
    )  # fmt: skip
    assert refused.returncode != 0
    assert tags(registry, "acme/copy") == ["dev", "latest"]

    # delete by tag: skopeo resolves it and deletes the version, its movable tags with it
    deleted = skopeo(
        "delete", "--tls-verify=false", "--creds", creds(ADMIN_TOKEN),
        registry.docker("acme/copy:dev"),
    )  # fmt: skip
    assert deleted.returncode == 0, deleted.stderr
    assert tags(registry, "acme/copy") == []

    # an immutable release tag keeps its protection: 405 with a message naming it
    release = skopeo(
        "delete", "--tls-verify=false", "--creds", creds(ADMIN_TOKEN),
        registry.docker("acme/release:v1"),
    )  # fmt: skip
    assert release.returncode != 0
    assert "immutable" in release.stderr
    assert "405" in release.stderr
    assert tags(registry, "acme/release") == ["v1"]

    # delete by digest
    copied = skopeo(
        "copy", "--dest-tls-verify=false", "--dest-creds", creds(ADMIN_TOKEN),
        layout, registry.docker("acme/digest:scratch"),
    )  # fmt: skip
    assert copied.returncode == 0, copied.stderr
    by_digest = skopeo(
        "delete", "--tls-verify=false", "--registry-token", ADMIN_TOKEN,
        registry.docker(f"acme/digest@{registry.source_digest}"),
    )  # fmt: skip
    assert by_digest.returncode == 0, by_digest.stderr
    gone = httpx.get(
        f"{registry.server.url}/v2/acme/digest/manifests/{registry.source_digest}", headers=ADMIN
    )
    assert gone.status_code == 404


def test_skopeo_registry_token_from_the_token_endpoint(registry: Registry) -> None:
    response = httpx.get(
        f"{registry.server.url}/token",
        params={"service": registry.host, "scope": "repository:acme/src:pull"},
        auth=("ci-robot", registry.reader),
    )
    assert response.status_code == 200, response.text
    scoped = response.json()["token"]

    inspected = skopeo(
        "inspect", "--raw", "--tls-verify=false", "--registry-token", scoped,
        registry.docker("acme/src:latest"),
    )  # fmt: skip
    assert inspected.returncode == 0, inspected.stderr
    # the token names acme/src only, and pull only
    other = skopeo(
        "inspect", "--raw", "--tls-verify=false", "--registry-token", scoped,
        registry.docker("acme/copy:latest"),
    )  # fmt: skip
    assert other.returncode != 0
    pushed = skopeo(
        "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
        "--src-registry-token", scoped, "--dest-registry-token", scoped,
        registry.docker("acme/src:latest"), registry.docker("acme/src:stolen"),
    )  # fmt: skip
    assert pushed.returncode != 0
    assert "stolen" not in tags(registry, "acme/src")

    # a plain peftreg token as registry token, and wrong Basic credentials
    plain = skopeo(
        "inspect", "--raw", "--tls-verify=false", "--registry-token", registry.reader,
        registry.docker("acme/src:latest"),
    )  # fmt: skip
    assert plain.returncode == 0, plain.stderr
    wrong = skopeo(
        "inspect", "--raw", "--tls-verify=false", "--creds", "ci-robot:prt_0_wrong",
        registry.docker("acme/src:latest"),
    )  # fmt: skip
    assert wrong.returncode != 0


def docker_manifest_inspect(
    registry: Registry, tmp_path: Path, entry: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """`docker manifest inspect` (no daemon needed) with `entry` as the host's credentials."""
    config = tmp_path / "docker" / str(len(list(tmp_path.glob("docker/*"))))
    config.mkdir(parents=True)
    (config / "config.json").write_text(json.dumps({"auths": {registry.host: entry}}))
    return subprocess.run(
        ["docker", "manifest", "inspect", "--insecure", f"{registry.host}/acme/src:latest"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "DOCKER_CONFIG": str(config)},
    )


def test_docker_manifest_inspect_without_a_daemon(registry: Registry, tmp_path: Path) -> None:
    # Basic credentials, exchanged at the Bearer realm
    auth = base64.b64encode(f"ci-robot:{registry.reader}".encode()).decode()
    result = docker_manifest_inspect(registry, tmp_path, {"auth": auth})
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    titles = [
        layer["annotations"]["org.opencontainers.image.title"] for layer in document["layers"]
    ]
    assert sorted(titles) == ["notes.md", "weights.dat"]
    # a registry token sent as is
    with_token = docker_manifest_inspect(registry, tmp_path, {"registrytoken": registry.reader})
    assert with_token.returncode == 0, with_token.stderr
    assert json.loads(with_token.stdout) == document
    wrong = base64.b64encode(b"ci-robot:prt_0_wrong").decode()
    assert docker_manifest_inspect(registry, tmp_path, {"auth": wrong}).returncode != 0


def test_oras_directory_layer_unpacks_and_referrers_list_it(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # oras reads ~/.docker/config.json
    model = tmp_path / "work" / "model"
    (model / "tokenizer").mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    os.symlink("config.json", model / "config-link.json")

    # oras-py through the Bearer token flow (its default auth backend)
    client = oras.client.OrasClient(hostname=registry.host, insecure=True)
    client.login(
        username="ci-robot",
        password=ADMIN_TOKEN,
        hostname=registry.host,
        config_path=str(tmp_path / "docker-config.json"),
    )
    container = client.get_container(f"{registry.host}/acme/dirs:v1")
    archive = oras.utils.make_targz(str(model))
    layer = oras.oci.NewLayer(archive, is_dir=True)
    # as the oras CLI writes a directory layer
    layer["annotations"] = {
        "org.opencontainers.image.title": "model",
        "io.deis.oras.content.unpack": "true",
    }
    assert client.upload_blob(archive, container, layer).status_code in (201, 202)
    config, config_file = oras.oci.ManifestConfig()
    with open(tmp_path / "config.json", "w") as handle:
        handle.write("{}")
    client.upload_blob(str(tmp_path / "config.json"), container, config)
    manifest = oras.oci.NewManifest()
    manifest["layers"] = [layer]
    manifest["config"] = config
    assert config_file is None
    assert client.upload_manifest(manifest, container).status_code == 201

    out = tmp_path / "pulled"
    env = {
        "PEFTREG_URL": f"http://{registry.host}",
        "PEFTREG_TOKEN": ADMIN_TOKEN,
        "PEFTREG_CACHE": str(tmp_path / "cache"),
        "PEFTREG_CONFIG": str(tmp_path / "peftreg.json"),
    }
    pulled = CliRunner().invoke(
        cli, ["pull", f"{registry.host}/acme/dirs:v1", "-o", str(out), "--json"], env=env
    )
    assert pulled.exit_code == 0, pulled.output
    assert json.loads(pulled.stdout)["unpacked"] == ["model"]
    assert (out / "model" / "config.json").read_text() == '{"model_type": "llama"}'
    assert (out / "model" / "tokenizer" / "vocab.txt").read_text() == "a\nb\n"
    assert (out / "model" / "config-link.json").read_text() == '{"model_type": "llama"}'
    assert (out / "model" / "config-link.json").is_symlink()
    # without an output, the unpacked tree sits next to the cache's snapshot
    cached = CliRunner().invoke(cli, ["pull", "acme/dirs:v1", "--json"], env=env)
    assert (Path(json.loads(cached.stdout)["path"]) / "model" / "tokenizer").is_dir()

    # a referrer pushed by oras-py names the directory artifact as its subject
    head = httpx.head(f"{registry.server.url}/v2/acme/dirs/manifests/v1", headers=ADMIN)
    subject = oras.oci.Subject(
        mediaType="application/vnd.oci.image.manifest.v1+json",
        digest=head.headers["Docker-Content-Digest"],
        size=int(head.headers["Content-Length"]),
    )
    monkeypatch.chdir(tmp_path / "work")
    (tmp_path / "work" / "sbom.json").write_text('{"packages": []}')
    response = client.push(
        target=f"{registry.host}/acme/dirs:sbom",
        files=["sbom.json:application/spdx+json"],
        subject=subject,
        quiet=True,
    )
    assert response.status_code == 201
    referrers = httpx.get(
        f"{registry.server.url}/v2/acme/dirs/referrers/{subject.digest}", headers=ADMIN
    ).json()["manifests"]
    assert len(referrers) == 1
    sbom = httpx.head(f"{registry.server.url}/v2/acme/dirs/manifests/sbom", headers=ADMIN)
    assert referrers[0]["digest"] == sbom.headers["Docker-Content-Digest"]

    # oras' tag delete resolves the tag and deletes by digest
    assert client.delete_tag(f"{registry.host}/acme/dirs", "sbom") is True
    assert tags(registry, "acme/dirs") == ["v1"]
    after = httpx.get(
        f"{registry.server.url}/v2/acme/dirs/referrers/{subject.digest}", headers=ADMIN
    )
    assert after.json()["manifests"] == []
