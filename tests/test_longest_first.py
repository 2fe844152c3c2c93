"""The list that orders the suite's longest files first names files that exist."""

from __future__ import annotations

from tests.conftest import LONGEST_FIRST, ROOT


def test_every_file_named_longest_first_is_a_test_file() -> None:
    missing = [path for path in LONGEST_FIRST if not (ROOT / path).is_file()]
    assert missing == [], f"renamed or removed, update LONGEST_FIRST: {missing}"
    assert len(set(LONGEST_FIRST)) == len(LONGEST_FIRST)
