"""oras directory layers: a tar+gzip layer annotated `io.deis.oras.content.unpack: true`.

`oras push REF DIR` packs DIR into one tar+gzip layer titled `DIR` whose
entries are `DIR/...`; `oras pull` unpacks it. peftreg does the same when it
writes a pull's files, refusing anything that could write outside the
layer's own folder: absolute names, `..`, entries outside `DIR/`, links
pointing out of it, hard links, device files and FIFOs, and archives over
the file-count or size bounds.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from peftreg.sdk.errors import UnsafePath

UNPACK_ANNOTATION = "io.deis.oras.content.unpack"
TAR_GZIP_MEDIA_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
    }
)
ENV_MAX_BYTES = "PEFTREG_UNPACK_MAX_BYTES"
ENV_MAX_FILES = "PEFTREG_UNPACK_MAX_FILES"
DEFAULT_MAX_BYTES = 64 * 1024**3
DEFAULT_MAX_FILES = 100_000


@dataclass(frozen=True)
class UnpackLimits:
    max_bytes: int = DEFAULT_MAX_BYTES
    max_files: int = DEFAULT_MAX_FILES

    @classmethod
    def from_env(cls) -> UnpackLimits:
        return cls(
            int(os.environ.get(ENV_MAX_BYTES, DEFAULT_MAX_BYTES)),
            int(os.environ.get(ENV_MAX_FILES, DEFAULT_MAX_FILES)),
        )


def is_directory_layer(media_type: str, annotations: Mapping[str, str] | None) -> bool:
    """Whether a layer is an oras directory to unpack on pull."""
    flag = (annotations or {}).get(UNPACK_ANNOTATION, "")
    return flag.lower() == "true" and media_type in TAR_GZIP_MEDIA_TYPES


def _entry_path(name: str, title: PurePosixPath, archive: str) -> PurePosixPath:
    """The entry's safe relative path, inside the layer's folder `title`."""
    if not name or "\x00" in name or "\\" in name:
        raise UnsafePath(f"{archive}: unsafe entry name {name!r}")
    if name.startswith("/"):
        raise UnsafePath(f"{archive}: entry {name!r} is an absolute path")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafePath(f"{archive}: entry {name!r} escapes the directory")
    path = PurePosixPath(*parts) if parts else PurePosixPath(".")
    if path != title and title not in path.parents:
        raise UnsafePath(f"{archive}: entry {name!r} is outside the layer's folder {title}")
    return path


def _check_link(member: tarfile.TarInfo, path: PurePosixPath, title: PurePosixPath) -> None:
    archive = str(title)
    if member.islnk():
        raise UnsafePath(f"{archive}: hard link {member.name!r} is not allowed")
    target = member.linkname
    if not target or target.startswith("/") or "\\" in target:
        raise UnsafePath(f"{archive}: symbolic link {member.name!r} points outside ({target!r})")
    resolved: list[str] = list(path.parent.parts)
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not resolved:
                raise UnsafePath(f"{archive}: symbolic link {member.name!r} points outside")
            resolved.pop()
        else:
            resolved.append(part)
    inside = PurePosixPath(*resolved) if resolved else PurePosixPath(".")
    if inside != title and title not in inside.parents:
        raise UnsafePath(
            f"{archive}: symbolic link {member.name!r} -> {target!r} points out of {title}"
        )


def checked_members(
    tar: tarfile.TarFile, title: PurePosixPath, limits: UnpackLimits
) -> list[tarfile.TarInfo]:
    """Every entry, checked; `UnsafePath` names the first that may not be written."""
    members: list[tarfile.TarInfo] = []
    total = 0
    for member in tar:
        path = _entry_path(member.name, title, str(title))
        if member.issym() or member.islnk():
            _check_link(member, path, title)
        elif not (member.isfile() or member.isdir()):
            raise UnsafePath(f"{title}: entry {member.name!r} is a device, FIFO or special file")
        total += member.size if member.isfile() else 0
        members.append(member)
        if len(members) > limits.max_files:
            raise UnsafePath(f"{title}: more than {limits.max_files} entries ({ENV_MAX_FILES})")
        if total > limits.max_bytes:
            raise UnsafePath(
                f"{title}: unpacks to more than {limits.max_bytes} bytes ({ENV_MAX_BYTES})"
            )
    return members


def unpack_directory(
    archive: Path, title: PurePosixPath, destination: Path, limits: UnpackLimits | None = None
) -> None:
    """Unpack the oras directory layer `archive` (titled `title`) into `destination`.

    Entries are `title/...`, so the folder appears as `destination/title`.
    """
    limits = limits or UnpackLimits.from_env()
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            members = checked_members(tar, title, limits)
            # Python's own "data" filter as a second guard (modes, links, specials).
            tar.extractall(destination, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise UnsafePath(f"{title}: not a readable tar+gzip directory layer: {exc}") from None
    if not (destination / title).is_dir():
        raise UnsafePath(f"{title}: the archive holds no folder named {title}")
