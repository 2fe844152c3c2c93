"""The local, content-addressed cache of pulled artifacts.

Layout under the cache root (`PEFTREG_CACHE`, by default the user cache
directory's `peftreg`):

    blobs/sha256/<hex>                    verified blobs, read-only
    blobs/sha256/<hex>.incomplete         a download in progress (resumable)
    blobs/sha256/<hex>.incomplete.parts   (left by older versions' parallel downloads)
    digests/<key>                         digests of pushed local files (transfer.digest_memo)
    manifests/sha256/<hex>                manifest bytes, verified
    refs/<repository>/_tags/<tag>         the manifest digest a tag last resolved to
                                          (`_tags` never names a repository segment, so
                                          `a/b:c` and repository `a/b/c` cannot collide)
    snapshots/sha256/<hex>/<title>        a manifest's files, hard links into blobs/
    locks/                                per-digest lock files

A blob appears under its digest only after every byte was verified, by an
atomic rename; a per-digest file lock makes concurrent processes download
it once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import platformdirs

from peftreg.digest import Digest, InvalidDigest, digest_file
from peftreg.file_lock import FileLock
from peftreg.names import InvalidName, check_repository_name, check_tag
from peftreg.sdk.errors import DigestMismatch, InvalidReferenceError

ENV_CACHE = "PEFTREG_CACHE"
ENV_OFFLINE = "PEFTREG_OFFLINE"
INCOMPLETE = ".incomplete"
PARTS = ".incomplete.parts"
TAGS_DIR = "_tags"


def default_cache_dir() -> Path:
    configured = os.environ.get(ENV_CACHE)
    if configured:
        return Path(configured).expanduser()
    return Path(platformdirs.user_cache_dir("peftreg"))


def offline_from_env() -> bool:
    return os.environ.get(ENV_OFFLINE, "").strip().lower() in {"1", "true", "yes", "on"}


def link_or_copy(source: Path, dest: Path) -> None:
    """Hard-link `source` to `dest`, copying when links are not possible."""
    try:
        os.link(source, dest)
    except FileExistsError:
        raise  # never overwrite: `dest` may itself be a link into the cache
    except OSError:
        shutil.copyfile(source, dest)


def remove_tree(path: Path) -> None:
    """Remove a tree, read-only files included."""

    def onerror(_func: object, target: str, _exc: object) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(target) or ".", 0o700)
            os.chmod(target, 0o644)
            if os.path.isdir(target):
                os.rmdir(target)
            else:
                os.unlink(target)

    if path.exists() or path.is_symlink():
        shutil.rmtree(path, onerror=onerror)


@dataclass(frozen=True)
class CachedRef:
    repository: str
    tag: str
    digest: Digest


@dataclass(frozen=True)
class CacheProblem:
    path: Path
    problem: str


class Cache:
    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = (default_cache_dir() if root is None else Path(root)).absolute()

    # blobs -----------------------------------------------------------------

    def blob_path(self, digest: Digest) -> Path:
        return self.root / "blobs" / digest.algorithm / digest.hex

    def incomplete_path(self, digest: Digest) -> Path:
        return self.blob_path(digest).with_name(digest.hex + INCOMPLETE)

    def parts_path(self, digest: Digest) -> Path:
        return self.blob_path(digest).with_name(digest.hex + PARTS)

    def has_blob(self, digest: Digest, size: int | None = None) -> bool:
        try:
            stat = self.blob_path(digest).stat()
        except FileNotFoundError:
            return False
        return size is None or stat.st_size == size

    def lock(self, name: str) -> FileLock:
        """An inter-process lock named by a digest or another key."""
        path = self.root / "locks" / (name.replace(":", "-").replace("/", "_") + ".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(path))

    def commit_blob(self, digest: Digest, partial: Path) -> Path:
        """Make a verified partial file the blob (atomic rename, read-only)."""
        target = self.blob_path(digest)
        os.chmod(partial, 0o444)
        os.replace(partial, target)
        with contextlib.suppress(FileNotFoundError):
            self.parts_path(digest).unlink()
        return target

    def discard_partial(self, digest: Digest) -> None:
        for path in (self.incomplete_path(digest), self.parts_path(digest)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def iter_blobs(self) -> Iterator[tuple[Digest, Path]]:
        base = self.root / "blobs"
        if not base.is_dir():
            return
        for algorithm_dir in sorted(base.iterdir()):
            for path in sorted(algorithm_dir.iterdir()):
                if "." in path.name:
                    continue
                try:
                    yield Digest.parse(f"{algorithm_dir.name}:{path.name}"), path
                except InvalidDigest:
                    continue

    # manifests and refs -----------------------------------------------------

    def manifest_path(self, digest: Digest) -> Path:
        return self.root / "manifests" / digest.algorithm / digest.hex

    def put_manifest(self, digest: Digest, content: bytes) -> None:
        actual = hashlib.new(digest.algorithm, content).hexdigest()
        if actual != digest.hex:
            raise DigestMismatch(f"manifest content is {digest.algorithm}:{actual}, not {digest}")
        self._write_atomic(self.manifest_path(digest), content)

    def get_manifest(self, digest: Digest) -> bytes | None:
        try:
            content = self.manifest_path(digest).read_bytes()
        except FileNotFoundError:
            return None
        if hashlib.new(digest.algorithm, content).hexdigest() != digest.hex:
            return None
        return content

    def ref_path(self, repository: str, tag: str) -> Path:
        try:
            check_repository_name(repository)
            check_tag(tag)
        except InvalidName as exc:
            raise InvalidReferenceError(str(exc)) from None
        return self.root / "refs" / repository / TAGS_DIR / tag

    def set_ref(self, repository: str, tag: str, digest: Digest) -> None:
        self._write_atomic(self.ref_path(repository, tag), str(digest).encode())

    def get_ref(self, repository: str, tag: str) -> Digest | None:
        try:
            text = self.ref_path(repository, tag).read_text().strip()
            return Digest.parse(text)
        except (FileNotFoundError, IsADirectoryError, InvalidDigest):
            return None

    def iter_refs(self) -> Iterator[CachedRef]:
        base = self.root / "refs"
        if not base.is_dir():
            return
        for path in sorted(base.rglob("*")):
            if not path.is_file() or path.name.startswith(".") or path.parent.name != TAGS_DIR:
                continue
            repository, tag = path.parent.parent.relative_to(base).as_posix(), path.name
            try:
                yield CachedRef(repository, tag, Digest.parse(path.read_text().strip()))
            except InvalidDigest:
                continue

    def iter_manifests(self) -> Iterator[Digest]:
        base = self.root / "manifests"
        if not base.is_dir():
            return
        for algorithm_dir in sorted(base.iterdir()):
            for path in sorted(algorithm_dir.iterdir()):
                with contextlib.suppress(InvalidDigest):
                    yield Digest.parse(f"{algorithm_dir.name}:{path.name}")

    # snapshots --------------------------------------------------------------

    def snapshot_path(self, manifest: Digest) -> Path:
        return self.root / "snapshots" / manifest.algorithm / manifest.hex

    def snapshot_complete(
        self, manifest: Digest, files: Sequence[tuple[PurePosixPath, Digest, int]]
    ) -> bool:
        base = self.snapshot_path(manifest)
        for title, _digest, size in files:
            try:
                if (base / title).stat().st_size != size:
                    return False
            except FileNotFoundError:
                return False
        return base.is_dir()

    def materialize(
        self, manifest: Digest, files: Sequence[tuple[PurePosixPath, Digest, int]]
    ) -> Path:
        """The manifest's files as a directory of links into blobs/ (built atomically)."""
        target = self.snapshot_path(manifest)
        if self.snapshot_complete(manifest, files):
            return target
        with self.lock(f"snapshot-{manifest}"):
            if self.snapshot_complete(manifest, files):
                return target
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = target.parent / f".{manifest.hex}.{uuid.uuid4().hex}.tmp"
            try:
                staging.mkdir()
                for title, digest, _size in files:
                    dest = staging / title
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    link_or_copy(self.blob_path(digest), dest)
                if target.exists():
                    remove_tree(target)
                os.rename(staging, target)
            finally:
                remove_tree(staging)
        return target

    # maintenance ------------------------------------------------------------

    def verify(self) -> list[CacheProblem]:
        """Re-hash every blob and manifest; the problems found."""
        problems: list[CacheProblem] = []
        for digest, path in self.iter_blobs():
            actual, _size = digest_file(path, digest.algorithm)
            if actual != digest:
                problems.append(CacheProblem(path, f"blob {digest} hashes to {actual}"))
        for digest in self.iter_manifests():
            if self.get_manifest(digest) is None:
                problems.append(
                    CacheProblem(self.manifest_path(digest), f"manifest {digest} is corrupted")
                )
        return problems

    def remove_blob(self, digest: Digest) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.blob_path(digest).unlink()

    def size(self) -> int:
        return sum(path.stat().st_size for _digest, path in self.iter_blobs())

    def clear(self) -> None:
        for name in ("blobs", "manifests", "refs", "snapshots", "locks"):
            remove_tree(self.root / name)

    def prune_partials(self) -> int:
        """Remove interrupted downloads; the bytes freed."""
        freed = 0
        base = self.root / "blobs"
        if not base.is_dir():
            return 0
        for path in base.rglob(f"*{INCOMPLETE}*"):
            name = f"sha256:{path.name.split('.')[0]}"
            with self.lock(name), contextlib.suppress(FileNotFoundError):
                freed += path.stat().st_size
                path.unlink()
        return freed

    def remove_snapshots(self) -> None:
        remove_tree(self.root / "snapshots")

    def referenced(self) -> tuple[set[Digest], set[Digest]]:
        """Manifests that refs name, and the blobs those manifests name."""
        manifests = {ref.digest for ref in self.iter_refs()}
        blobs: set[Digest] = set()
        for digest in manifests:
            content = self.get_manifest(digest)
            if content is None:
                continue
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                document = json.loads(content)
                for item in [document.get("config"), *(document.get("layers") or [])]:
                    if isinstance(item, dict) and isinstance(item.get("digest"), str):
                        with contextlib.suppress(InvalidDigest):
                            blobs.add(Digest.parse(item["digest"]))
        return manifests, blobs

    def prune(self) -> int:
        """Remove partial downloads and what no ref reaches; the bytes freed."""
        freed = self.prune_partials()
        manifests, blobs = self.referenced()
        for digest in list(self.iter_manifests()):
            if digest not in manifests:
                self.manifest_path(digest).unlink(missing_ok=True)
        snapshots = self.root / "snapshots"
        if snapshots.is_dir():
            for algorithm_dir in snapshots.iterdir():
                for path in algorithm_dir.iterdir():
                    name = f"{algorithm_dir.name}:{path.name}"
                    try:
                        keep = Digest.parse(name) in manifests
                    except InvalidDigest:
                        keep = False
                    if not keep:
                        remove_tree(path)
        for digest, path in list(self.iter_blobs()):
            if digest in blobs:
                continue
            with self.lock(str(digest)), contextlib.suppress(FileNotFoundError):
                freed += path.stat().st_size
                path.unlink()
        return freed

    def _write_atomic(self, path: Path, content: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        staging.write_bytes(content)
        os.replace(staging, path)
