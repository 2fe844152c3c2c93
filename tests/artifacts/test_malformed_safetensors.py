"""A corpus of malformed safetensors files pushed as adapter layers: each refused, none stored."""

from __future__ import annotations

import json
import struct

import httpx
import pytest

from peftreg.adapters.schema import TensorSpec
from peftreg.manifest import canonical_json
from tests.artifacts.conftest import Q_PROJ, adapter_config, error, push_adapter
from tests.fixtures.server import RegistryProcess


def _file(header: object | bytes, data: bytes = b"", *, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _t(dtype: str, shape: object, offsets: object) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


A = f"base_model.model.{Q_PROJ}.lora_A.weight"
B = f"base_model.model.{Q_PROJ}.lora_B.weight"

CORPUS: dict[str, tuple[bytes, str]] = {
    "too-short": (b"\x01\x02\x03", "too short"),
    "length-past-end": (_file({}, length=1000), "runs past the end"),
    "huge-length": (_file({}, length=2**63), "exceeds"),
    "not-utf8": (_file(b"\xff\xfe{}"), "not UTF-8"),
    "not-json": (_file(b"{not json"), "not valid JSON"),
    "json-array": (_file([]), "not an object"),
    "unknown-dtype": (_file({A: _t("F128", [2], [0, 8])}, b"\0" * 8), "unknown dtype"),
    "size-mismatch": (_file({A: _t("F32", [2], [0, 4])}, b"\0" * 4), "need 8"),
    "offsets-out-of-range": (_file({A: _t("F32", [2], [0, 8])}, b"\0" * 4), "run past"),
    "overlapping": (
        _file({A: _t("F32", [2], [0, 8]), B: _t("F32", [2], [4, 12])}, b"\0" * 12),
        "overlap",
    ),
    "gap": (_file({A: _t("F32", [2], [0, 8]), B: _t("F32", [2], [12, 20])}, b"\0" * 20), "gap"),
    "trailing-bytes": (_file({A: _t("F32", [2], [0, 8])}, b"\0" * 12), "cover only"),
    "non-string-metadata": (_file({"__metadata__": {"format": 1}}), "must be a string"),
    "metadata-not-object": (_file({"__metadata__": ["pt"]}), "must be an object"),
    "duplicate-keys": (
        _file(b'{"x": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}, "x": {}}', b"\0" * 4),
        "duplicate key",
    ),
    "negative-shape": (_file({A: _t("F32", [-1], [0, 0])}), "non-negative"),
    "bool-shape": (_file({A: _t("F32", [True], [0, 4])}, b"\0" * 4), "non-negative"),
    "shape-not-list": (_file({A: _t("F32", "2", [0, 8])}, b"\0" * 8), "shape must be a list"),
    "end-before-begin": (_file({A: _t("F32", [0], [8, 0])}, b"\0" * 8), "before begin"),
    "offsets-one-value": (_file({A: _t("F32", [2], [0])}, b"\0" * 8), "data_offsets must be"),
    "entry-not-object": (_file({A: 5}), "entry must be an object"),
    "truncated-file": (
        _file({A: _t("F32", [4, 16], [0, 256])}, b"\0" * 100),
        "run past",
    ),
}


def _config() -> bytes:
    config = adapter_config({}, {Q_PROJ: 4})
    config = config.model_copy(update={"tensors": [TensorSpec(name=A, dtype="F32", shape=(4, 16))]})
    return canonical_json(config.model_dump(mode="json"))


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_malformed_layer_is_refused(http: httpx.Client, case: str) -> None:
    data, expected = CORPUS[case]
    response = push_adapter(http, "acme/malformed", case, _config(), data)
    assert response.status_code == 422, response.text
    code, message = error(response)
    assert code == "SAFETENSORS_INVALID"
    assert expected in message, message
    assert "adapter_model.safetensors" in message
    assert http.get(f"/v2/acme/malformed/manifests/{case}").status_code == 404


def test_server_survives_the_corpus(http: httpx.Client, server: RegistryProcess) -> None:
    for case, (data, _expected) in sorted(CORPUS.items()):
        assert push_adapter(http, "acme/corpus", case, _config(), data).status_code == 422
    assert http.get("/healthz").status_code == 200
    assert http.get("/v2/acme/corpus/tags/list").json().get("tags") in (None, [])
    listed = http.get("/api/v1/versions", params={"limit": 1000}).json()["items"]
    assert not [item for item in listed if item["repository"] in ("acme/corpus", "acme/malformed")]
    assert server.process is not None
    assert server.process.poll() is None
