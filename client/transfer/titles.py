"""Layer titles as relative paths, refusing any that would escape a directory.

One rule set for both sides: the client checks titles before it pushes and
before it writes a pulled file, and the registry refuses manifests of
peftreg's own artifact types whose titles break the rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import Protocol

from peftreg.media_types import TITLE_ANNOTATION
from peftreg.sdk.errors import UnsafePath


class Titled(Protocol):
    """A descriptor as the registry's models and a pull's reader both have it."""

    @property
    def digest(self) -> str: ...

    @property
    def annotations(self) -> dict[str, str] | None: ...


def check_title(title: str) -> PurePosixPath:
    """The title as a safe relative path, or `UnsafePath`.

    Refused: empty titles, absolute paths, drive or UNC prefixes, backslashes,
    `.` and `..` components, NUL bytes.
    """
    if not title or "\x00" in title or "\\" in title:
        raise UnsafePath(f"unsafe layer title {title!r}", detail={"title": title})
    path = PurePosixPath(title)
    if path.is_absolute() or (len(title) >= 2 and title[1] == ":"):
        raise UnsafePath(f"layer title {title!r} is an absolute path", detail={"title": title})
    parts = title.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise UnsafePath(
            f"layer title {title!r} escapes the output directory or is not normal",
            detail={"title": title},
        )
    return path


def check_titles(titles: list[str]) -> list[PurePosixPath]:
    """Check every title and that no two name the same file, or one another's folder.

    An error's `detail` names the title (and `layer`, its index in `titles`).
    """
    paths = []
    for index, title in enumerate(titles):
        try:
            paths.append(check_title(title))
        except UnsafePath as exc:
            raise UnsafePath(
                f"layer {index}: {exc.message}", detail={"layer": index, "title": title}
            ) from None
    # Case-folded: on macOS and Windows `A.bin` and `a.bin` are one file.
    seen: dict[str, int] = {}
    for index, path in enumerate(paths):
        first = seen.setdefault(str(path).casefold(), index)
        if first != index:
            raise UnsafePath(
                f"layers {first} and {index} have the same title {titles[index]!r} (ignoring case)",
                detail={"layer": index, "title": titles[index]},
            )
    for index, path in enumerate(paths):
        for parent in path.parents:
            if str(parent) != "." and str(parent).casefold() in seen:
                raise UnsafePath(
                    f"layer title {str(parent)!r} is both a file and a folder",
                    detail={"layer": index, "title": titles[index]},
                )
    return paths


def layer_paths(layers: Sequence[Titled]) -> list[PurePosixPath]:
    """Where each layer is pulled to: its title, or its digest when it has none; checked."""
    titles = [
        (layer.annotations or {}).get(TITLE_ANNOTATION) or layer.digest.replace(":", "-")
        for layer in layers
    ]
    return check_titles(titles)
