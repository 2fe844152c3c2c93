"""The cache's file lock excludes other processes and threads, as `filelock` users see it."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import filelock
import pytest

from peftreg.file_lock import FileLock

HOLD = """
import sys
from peftreg.file_lock import FileLock
with FileLock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.readline()
"""


def test_another_process_holding_it_excludes_us(tmp_path: Path) -> None:
    path = str(tmp_path / "blob.lock")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None
    assert holder.stdin is not None
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(filelock.Timeout):  # the filelock package sees it too
            filelock.FileLock(path, timeout=0).acquire()
        holder.stdin.write("release\n")
        holder.stdin.flush()
        assert holder.wait(timeout=60) == 0
    finally:
        holder.kill()
    with FileLock(path):  # free again
        pass


def test_threads_exclude_each_other_and_take_turns(tmp_path: Path) -> None:
    path = str(tmp_path / "blob.lock")
    order: list[str] = []
    entered = threading.Event()

    def second() -> None:
        entered.set()
        with FileLock(path):
            order.append("second")

    with FileLock(path):
        worker = threading.Thread(target=second)
        worker.start()
        entered.wait(timeout=60)
        with pytest.raises(filelock.Timeout):
            filelock.FileLock(path, timeout=0).acquire()
        order.append("first")
    worker.join(timeout=60)
    assert order == ["first", "second"]
