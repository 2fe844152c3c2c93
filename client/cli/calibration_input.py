"""`peftreg merge --calibration`: calibration text from a local file or a registry artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftreg.cli.common import make_client, parse_reference
from peftreg.digest import Digest
from peftreg.formats.calibration import (
    MAX_CALIBRATION_BYTES,
    InvalidCalibration,
    calibration_file,
    parse_calibration,
)
from peftreg.manifest import ImageManifest, parse_manifest


def read_calibration(source: str) -> tuple[list[str], dict[str, Any]]:
    """(documents, what the recipe records): `source` is a file, else a reference whose
    artifact holds one text or JSONL file."""
    path = Path(source)
    if path.is_file():
        size = path.stat().st_size
        if size > MAX_CALIBRATION_BYTES:
            raise InvalidCalibration(
                f"calibration file {path} holds {size} bytes, more than the "
                f"{MAX_CALIBRATION_BYTES} allowed"
            )
        data = path.read_bytes()
        documents = parse_calibration(data, path.name)
        return documents, {"file": path.name, "file_digest": str(Digest.of_bytes(data))}
    reference = parse_reference(source)
    with make_client(reference) as client:
        response = client.get_manifest(reference)
        where = f"{reference.repository}@{response.digest}"
        manifest = parse_manifest(response.content, response.media_type)
        if not isinstance(manifest, ImageManifest):
            raise InvalidCalibration(f"{where} is an index, not a calibration artifact")
        found = calibration_file(manifest, where)
        data = client.get_blob(reference.repository, found.digest)
    try:
        documents = parse_calibration(data, found.title)
    except InvalidCalibration as error:
        raise InvalidCalibration(f"{where}: {error.message}") from None
    recipe = {
        "repository": reference.repository,
        "digest": response.digest,
        "file": found.title,
        "file_digest": found.digest,
    }
    return documents, recipe
