"""Early writeback (`peftreg.writeback`): found on Linux without running any program."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from peftreg import writeback


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_linux_finds_sync_file_range_among_the_loaded_symbols(tmp_path: Path) -> None:
    assert writeback._load() is not None
    target = tmp_path / "blob"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT)
    try:
        early = writeback.EarlyWriteback(fd, 0, every=4096)
        written = 0
        for _ in range(5):
            written += os.write(fd, b"x" * 3000)
            early.written(written)
        assert early._requested == 12000  # asked at 6000 and 12000 bytes, the tail left to fsync
    finally:
        os.close(fd)
    assert target.read_bytes() == b"x" * 15000
