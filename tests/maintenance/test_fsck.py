"""`fsck` against a real registry's store: clean, a flipped byte, bytes deleted out of band."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
from click.testing import CliRunner, Result

from peftreg.cli.main import cli
from peftreg.digest import Digest
from peftreg.registry.app import build_services
from peftreg.registry.maintenance.fsck import check_store
from peftreg.registry.settings import Settings
from tests.fixtures.server import RegistryProcess
from tests.integration.oci_helpers import digest_of, make_artifact, push_artifact


def blob_file(home: Path, digest: str) -> Path:
    parsed = Digest.parse(digest)
    return home / "storage" / "blobs" / parsed.algorithm / parsed.hex[:2] / parsed.hex


def fsck(home: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["fsck", *args], env={"PEFTREG_HOME": str(home)})


def test_fsck_finds_flipped_bytes_missing_objects_and_orphans(
    registry_server: RegistryProcess,
) -> None:
    home = registry_server.home
    flipped_layer = b"a layer whose byte will flip " * 64
    deleted_layer = b"a layer deleted out of band " * 64
    with httpx.Client(base_url=registry_server.url, timeout=30) as client:
        push_artifact(client, "acme/flip", "v1", make_artifact(flipped_layer, name="flip"))
        broken = push_artifact(client, "acme/gone", "v1", make_artifact(deleted_layer, name="g"))
        # A second repository naming the same bytes: both manifests break together.
        also_broken = push_artifact(
            client, "acme/gone-too", "v1", make_artifact(deleted_layer, name="g2")
        )
    services = build_services(Settings(home=home))
    try:
        clean = check_store(services)
        assert clean.problems == []
        assert clean.blobs_checked == 5  # three configs, two layers
        assert clean.manifests_checked == 3
        assert clean.bytes_checked > len(flipped_layer) + len(deleted_layer)
        ok = fsck(home)
        assert ok.exit_code == 0, ok.output

        path = blob_file(home, digest_of(flipped_layer))
        data = bytearray(path.read_bytes())
        data[100] ^= 0x01
        path.write_bytes(bytes(data))
        blob_file(home, digest_of(deleted_layer)).unlink()
        orphan = b"bytes that no row records"
        orphan_path = blob_file(home, digest_of(orphan))
        orphan_path.parent.mkdir(parents=True, exist_ok=True)
        orphan_path.write_bytes(orphan)

        report = check_store(services)
        found = {(p.kind, p.digest, p.manifest, p.repository) for p in report.problems}
        actual = f"sha256:{hashlib.sha256(bytes(data)).hexdigest()}"
        assert found == {
            ("digest_mismatch", digest_of(flipped_layer), None, None),
            ("missing_object", digest_of(deleted_layer), None, None),
            ("manifest_blob_missing", digest_of(deleted_layer), broken, "acme/gone"),
            ("manifest_blob_missing", digest_of(deleted_layer), also_broken, "acme/gone-too"),
            ("orphan_object", digest_of(orphan), None, None),
        }
        mismatch = next(p for p in report.problems if p.kind == "digest_mismatch")
        assert actual in mismatch.detail
        assert [p.kind for p in report.orphans] == ["orphan_object"]
        assert len(report.errors) == 4

        broken_run = fsck(home)
        assert broken_run.exit_code == 1
        lines = broken_run.stdout.splitlines()
        assert len(lines) == 5, broken_run.stdout
        assert any(
            line.startswith("manifest_blob_missing: acme/gone@") and broken in line
            for line in lines
        )
        assert "4 problem(s) found" in broken_run.stderr

        # Sizes only: the flipped byte goes unnoticed, the missing bytes do not.
        quick = fsck(home, "--no-verify-digests", "--json")
        assert quick.exit_code == 1
        document = json.loads(quick.stdout)
        kinds = sorted(problem["kind"] for problem in document["problems"])
        assert kinds == [
            "manifest_blob_missing",
            "manifest_blob_missing",
            "missing_object",
            "orphan_object",
        ]
        assert document["errors"] == 3
        assert document["bytes_checked"] == 0
    finally:
        services.engine.dispose()
