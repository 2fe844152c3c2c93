from __future__ import annotations

import pytest

from peftreg.sdk.errors import UnsafePath
from peftreg.transfer.titles import check_titles


@pytest.mark.parametrize(
    "titles",
    [
        ["../x"],
        ["/etc/passwd"],
        ["a\\b"],
        ["C:x"],
        ["a/./b"],
        ["a", "a"],
        ["Adapter.safetensors", "adapter.safetensors"],  # one file on macOS/Windows
        ["sub", "sub/x"],
        ["Sub", "sub/x"],
    ],
)
def test_unsafe_or_colliding_titles_are_refused(titles: list[str]) -> None:
    with pytest.raises(UnsafePath):
        check_titles(titles)


def test_nested_titles_are_fine() -> None:
    assert [str(p) for p in check_titles(["a.txt", "sub/w.bin"])] == ["a.txt", "sub/w.bin"]


def test_a_refusal_names_the_layer() -> None:
    with pytest.raises(UnsafePath, match=r"layer 1: .*'\.\./x'") as refused:
        check_titles(["ok.txt", "../x"])
    assert refused.value.detail == {"layer": 1, "title": "../x"}
    with pytest.raises(UnsafePath, match=r"layers 0 and 1 have the same title 'A\.bin'"):
        check_titles(["a.bin", "A.bin"])
