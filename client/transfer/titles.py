"""Layer titles as relative paths, refusing any that would escape a directory."""

from __future__ import annotations

from pathlib import PurePosixPath

from peftreg.sdk.errors import UnsafePath


def check_title(title: str) -> PurePosixPath:
    """The title as a safe relative path, or `UnsafePath`.

    Refused: empty titles, absolute paths, drive or UNC prefixes, backslashes,
    `.` and `..` components, NUL bytes.
    """
    if not title or "\x00" in title or "\\" in title:
        raise UnsafePath(f"unsafe layer title {title!r}")
    path = PurePosixPath(title)
    if path.is_absolute() or (len(title) >= 2 and title[1] == ":"):
        raise UnsafePath(f"layer title {title!r} is an absolute path")
    parts = title.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise UnsafePath(f"layer title {title!r} escapes the output directory or is not normal")
    return path


def check_titles(titles: list[str]) -> list[PurePosixPath]:
    """Check every title and that no two name the same file, or one another's folder."""
    paths = [check_title(title) for title in titles]
    # Case-folded: on macOS and Windows `A.bin` and `a.bin` are one file.
    seen = {str(path).casefold() for path in paths}
    if len(seen) != len(paths):
        raise UnsafePath("two layers have the same title (ignoring case)")
    for path in paths:
        for parent in path.parents:
            if str(parent) != "." and str(parent).casefold() in seen:
                raise UnsafePath(f"layer title {str(parent)!r} is both a file and a folder")
    return paths
