"""Calibration text for GPTQ / AWQ: a UTF-8 text file or JSONL with a `text` field per line.

Importable without torch: the API server validates a calibration artifact
with it when an export is requested, so a request that cannot calibrate is
refused (400) before any work. The worker and the local CLI parse the same
bytes the same way.

- A file named `*.jsonl` / `*.ndjson`, or whose first non-blank character
  is `{`, is JSONL: every non-blank line is a JSON object with a non-empty
  string `text`; each is one document.
- Anything else is plain text: the whole file is one document (it is cut
  into token windows later, as WikiText-style calibration is).

Refused, with the cause named: an empty or blank file, bytes that are not
UTF-8 or hold NUL characters (binary), a JSONL line that is not JSON, not an
object, or has no string `text`, a file over `MAX_CALIBRATION_BYTES`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from peftreg.manifest import TITLE_ANNOTATION, ImageManifest
from peftreg.sdk.errors import InvalidRequest

MAX_CALIBRATION_BYTES = 64 * 1024 * 1024
JSONL_SUFFIXES = (".jsonl", ".ndjson")


class InvalidCalibration(InvalidRequest):
    """Calibration text that cannot be used: empty, binary, or JSONL without `text`."""


@dataclass(frozen=True)
class CalibrationFile:
    """The one file of a calibration artifact, as its manifest describes it."""

    title: str
    digest: str
    size: int


def calibration_file(manifest: ImageManifest, where: str) -> CalibrationFile:
    """The single titled layer of a calibration artifact `where`, within the size limit."""
    if len(manifest.layers) != 1:
        raise InvalidCalibration(
            f"{where} holds {len(manifest.layers)} files; a calibration artifact is one text "
            "or JSONL file (`peftreg push calibration.jsonl REPO:TAG`)"
        )
    layer = manifest.layers[0]
    title = (layer.annotations or {}).get(TITLE_ANNOTATION) or layer.digest
    if layer.size > MAX_CALIBRATION_BYTES:
        raise InvalidCalibration(
            f"{where}: calibration file {title} holds {layer.size} bytes, more than the "
            f"{MAX_CALIBRATION_BYTES} allowed"
        )
    return CalibrationFile(title, layer.digest, layer.size)


def parse_calibration(data: bytes, name: str) -> list[str]:
    """The documents of a calibration file `name` holding `data`, in file order."""
    if len(data) > MAX_CALIBRATION_BYTES:
        raise InvalidCalibration(
            f"calibration file {name} holds {len(data)} bytes, more than the "
            f"{MAX_CALIBRATION_BYTES} allowed"
        )
    if b"\x00" in data:
        raise InvalidCalibration(
            f"calibration file {name} holds NUL bytes: it is binary, not UTF-8 text or JSONL"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise InvalidCalibration(
            f"calibration file {name} is not UTF-8 text (byte {error.start} is invalid); "
            "give a text or JSONL file"
        ) from None
    stripped = text.strip()
    if not stripped:
        raise InvalidCalibration(f"calibration file {name} is empty")
    if name.lower().endswith(JSONL_SUFFIXES) or stripped.startswith("{"):
        return _jsonl_documents(text, name)
    return [text]


def _jsonl_documents(text: str, name: str) -> list[str]:
    documents: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise InvalidCalibration(
                f"calibration file {name} line {number} is not JSON ({error.msg})"
            ) from None
        if not isinstance(record, dict):
            raise InvalidCalibration(
                f"calibration file {name} line {number} is not a JSON object with a text field"
            )
        value = record.get("text")
        if not isinstance(value, str):
            raise InvalidCalibration(
                f'calibration file {name} line {number} has no string "text" field'
            )
        if value.strip():
            documents.append(value)
    if not documents:
        raise InvalidCalibration(f'calibration file {name} has no non-empty "text" value')
    return documents


__all__ = [
    "MAX_CALIBRATION_BYTES",
    "CalibrationFile",
    "InvalidCalibration",
    "calibration_file",
    "parse_calibration",
]
