"""Write a directory next to its final place and rename it into place (atomic)."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from peftreg.sdk.errors import Conflict


def write_directory(out_dir: Path, writer: Callable[[Path], None], *, replace: bool) -> None:
    """Call `writer(staging)` to fill a staging directory, then rename it to `out_dir`
    (an existing non-empty `out_dir` only with `replace`)."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise Conflict(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not replace:
        raise Conflict(f"{out_dir} exists and is not empty; pass --force to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.peftreg-{uuid.uuid4().hex}"
    retired = out_dir.parent / f".{out_dir.name}.peftreg-old-{uuid.uuid4().hex}"
    try:
        staging.mkdir()
        writer(staging)
        if out_dir.is_dir():
            os.rename(out_dir, retired)
        os.rename(staging, out_dir)
    except BaseException:
        if retired.exists() and not out_dir.exists():
            os.rename(retired, out_dir)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)
