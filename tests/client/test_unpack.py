"""Unpacking oras directory layers: what a well-formed one gives, and every escape refused."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import pytest

from peftreg.sdk.errors import UnsafePath
from peftreg.transfer.unpack import UnpackLimits, is_directory_layer, unpack_directory

TITLE = PurePosixPath("model")
TAR_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"

Entry = Callable[[tarfile.TarFile], None]


def file_entry(name: str, data: bytes = b"x") -> Entry:
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    return add


def special_entry(name: str, kind: bytes, linkname: str = "") -> Entry:
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = linkname
        tar.addfile(info)

    return add


def archive(path: Path, *entries: Entry) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        special_entry("model", tarfile.DIRTYPE)(tar)
        for entry in entries:
            entry(tar)
    return path


def test_directory_layer_is_recognised_by_annotation_and_media_type() -> None:
    assert is_directory_layer(TAR_GZ, {"io.deis.oras.content.unpack": "true"})
    assert is_directory_layer(TAR_GZ, {"io.deis.oras.content.unpack": "True"})
    assert not is_directory_layer(TAR_GZ, {"io.deis.oras.content.unpack": "false"})
    assert not is_directory_layer(TAR_GZ, {})
    assert not is_directory_layer(
        "application/octet-stream", {"io.deis.oras.content.unpack": "true"}
    )


def test_well_formed_directory_unpacks_with_internal_links(tmp_path: Path) -> None:
    layer = archive(
        tmp_path / "ok.tar.gz",
        special_entry("model/sub", tarfile.DIRTYPE),
        file_entry("model/config.json", b"{}"),
        file_entry("./model/sub/weights.bin", b"w" * 100),
        special_entry("model/link.bin", tarfile.SYMTYPE, "sub/weights.bin"),
        special_entry("model/sub/up.json", tarfile.SYMTYPE, "../config.json"),
    )
    out = tmp_path / "out"
    out.mkdir()
    unpack_directory(layer, TITLE, out)
    assert (out / "model" / "config.json").read_bytes() == b"{}"
    assert (out / "model" / "sub" / "weights.bin").read_bytes() == b"w" * 100
    assert (out / "model" / "link.bin").read_bytes() == b"w" * 100
    assert (out / "model" / "sub" / "up.json").read_bytes() == b"{}"


@pytest.mark.parametrize(
    ("entry", "cause"),
    [
        (file_entry("/etc/owned"), "absolute"),
        (file_entry("model/../../owned"), "escapes"),
        (file_entry("other/file"), "outside the layer's folder"),
        (special_entry("model/up", tarfile.SYMTYPE, "../../etc/passwd"), "points out"),
        (special_entry("model/abs", tarfile.SYMTYPE, "/etc/passwd"), "points outside"),
        (special_entry("model/sibling", tarfile.SYMTYPE, "../other"), "points out"),
        (special_entry("model/hard", tarfile.LNKTYPE, "model/config.json"), "hard link"),
        (special_entry("model/tty", tarfile.CHRTYPE), "device"),
        (special_entry("model/fifo", tarfile.FIFOTYPE), "device, FIFO"),
    ],
)
def test_escapes_are_refused_and_nothing_is_written(
    tmp_path: Path, entry: Entry, cause: str
) -> None:
    layer = archive(tmp_path / "bad.tar.gz", file_entry("model/config.json"), entry)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UnsafePath, match=cause):
        unpack_directory(layer, TITLE, out)
    assert list(out.iterdir()) == []
    assert not (tmp_path / "owned").exists()


def test_size_and_count_bounds(tmp_path: Path) -> None:
    layer = archive(
        tmp_path / "big.tar.gz", *(file_entry(f"model/f{i}", b"z" * 1000) for i in range(5))
    )
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UnsafePath, match="more than 3 entries"):
        unpack_directory(layer, TITLE, out, UnpackLimits(max_bytes=10**9, max_files=3))
    with pytest.raises(UnsafePath, match="more than 2500 bytes"):
        unpack_directory(layer, TITLE, out, UnpackLimits(max_bytes=2500, max_files=100))
    assert list(out.iterdir()) == []


def test_not_a_tarball_is_refused(tmp_path: Path) -> None:
    layer = tmp_path / "junk.tar.gz"
    layer.write_bytes(b"not gzip at all")
    with pytest.raises(UnsafePath, match="not a readable tar"):
        unpack_directory(layer, TITLE, tmp_path)
