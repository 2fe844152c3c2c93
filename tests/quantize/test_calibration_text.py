"""Calibration text files: plain text and JSONL accepted, unusable files refused by cause."""

from __future__ import annotations

import json

import pytest

from peftreg.formats.calibration import (
    MAX_CALIBRATION_BYTES,
    InvalidCalibration,
    calibration_file,
    parse_calibration,
)
from peftreg.manifest import ImageManifest
from peftreg.quantize.calibrated import calibration_windows


def test_plain_text_is_one_document() -> None:
    text = "The with statement.\n\nIt wraps a block.\n"
    assert parse_calibration(text.encode(), "wiki.txt") == [text]


def test_jsonl_gives_a_document_per_line_by_name_or_by_content() -> None:
    lines = [json.dumps({"text": "first"}), "", json.dumps({"text": "second", "id": 2})]
    data = "\n".join(lines).encode()
    assert parse_calibration(data, "calib.jsonl") == ["first", "second"]
    assert parse_calibration(data, "calib.data") == ["first", "second"]


@pytest.mark.parametrize(
    ("data", "name", "cause"),
    [
        pytest.param(b"", "empty.txt", "is empty", id="empty"),
        pytest.param(b" \n\t\n", "blank.txt", "is empty", id="blank"),
        pytest.param(b"PK\x03\x04\x00\x00", "model.bin", "binary", id="nul-bytes"),
        pytest.param(b"caf\xe9 au lait", "latin1.txt", "not UTF-8", id="not-utf8"),
        pytest.param(b'{"prompt": "x"}\n', "calib.jsonl", 'no string "text"', id="no-text"),
        pytest.param(b'{"text": 3}\n', "calib.jsonl", 'no string "text"', id="text-not-string"),
        pytest.param(b'{"text": "a"}\n[1]\n', "c.jsonl", "line 2 is not a JSON object", id="array"),
        pytest.param(b'{"text": "a"}\n{oops\n', "c.jsonl", "line 2 is not JSON", id="bad-json"),
        pytest.param(b'{"text": "  "}\n', "c.jsonl", 'no non-empty "text"', id="blank-texts"),
    ],
)
def test_unusable_calibration_is_refused_naming_the_cause(
    data: bytes, name: str, cause: str
) -> None:
    with pytest.raises(InvalidCalibration) as refused:
        parse_calibration(data, name)
    assert cause in refused.value.message
    assert name in refused.value.message


def test_calibration_artifact_must_be_one_file_within_the_limit() -> None:
    def manifest(*sizes: int) -> ImageManifest:
        return ImageManifest.model_validate(
            {
                "schemaVersion": 2,
                "config": {
                    "mediaType": "application/json",
                    "digest": "sha256:" + "0" * 64,
                    "size": 2,
                },
                "layers": [
                    {
                        "mediaType": "application/octet-stream",
                        "digest": "sha256:" + str(index) * 64,
                        "size": size,
                        "annotations": {"org.opencontainers.image.title": f"f{index}.txt"},
                    }
                    for index, size in enumerate(sizes, start=1)
                ],
            }
        )

    found = calibration_file(manifest(10), "acme/calib@sha256:x")
    assert (found.title, found.size) == ("f1.txt", 10)
    with pytest.raises(InvalidCalibration, match="holds 2 files"):
        calibration_file(manifest(10, 20), "acme/calib@sha256:x")
    with pytest.raises(InvalidCalibration, match="more than"):
        calibration_file(manifest(MAX_CALIBRATION_BYTES + 1), "acme/calib@sha256:x")


def test_windows_cut_documents_and_spread_the_chosen_samples() -> None:
    documents = [list(range(100)), list(range(1000, 1010)), [7]]
    windows = calibration_windows(documents, samples=100, length=32)
    # 100 tokens: 32, 32, 32 and a last 4 dropped (less than half a window); 10: its only
    # window; 1 token: nothing to predict.
    assert [len(window) for window in windows] == [32, 32, 32, 10]
    assert windows[1][0] == 32
    chosen = calibration_windows([list(range(32 * 8))], samples=4, length=32)
    assert [window[0] for window in chosen] == [0, 64, 128, 192]
