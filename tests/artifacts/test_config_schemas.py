"""The published JSON schemas (`/schemas/<name>`) accept every config the project produces.

Adapter configs come from real PEFT directories of every kind (and a NOLA
import), the base config from a saved model; checkpoint recipes are checked
where real exports are made (tests/jobs/test_export.py, through
`assert_valid_config`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from peft import get_peft_model

from peftreg.adapters.base_package import build_base_config
from peftreg.adapters.nola import import_reference_checkpoint
from peftreg.adapters.peft_import import read_peft_directory
from peftreg.adapters.schema import ADAPTER_CONFIG_MEDIA_TYPE, BASE_CONFIG_MEDIA_TYPE
from peftreg.artifact_schemas import SCHEMA_MEDIA_TYPE, schema_names
from peftreg.registry.app import build_services, create_app
from peftreg.registry.settings import Settings
from tests.adapters.documents import assert_document_is_the_model
from tests.adapters.test_nola import reference_checkpoint
from tests.adapters.test_peft_roundtrip import CASES, _perturb
from tests.adapters.tiny_models import tiny_llama
from tests.fixtures.schemas import assert_valid_config, published_schemas


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(home=tmp_path_factory.mktemp("schemas"), embedded_worker=False)
    services = build_services(settings)
    try:
        with TestClient(create_app(settings, services)) as client:
            yield client
    finally:
        services.engine.dispose()


def test_schemas_are_served_at_a_stable_url(service: TestClient) -> None:
    assert schema_names() == [
        "adapter.config.v1.json",
        "base.config.v1.json",
        "checkpoint.config.v1.json",
        "prompt.config.v1.json",
    ]
    for name, schema in published_schemas().items():
        response = service.get(f"/schemas/{name}")
        assert response.status_code == 200
        assert response.headers["content-type"] == SCHEMA_MEDIA_TYPE
        assert response.json() == schema
        assert schema["$id"] == f"/schemas/{name}"
    missing = service.get("/schemas/lora.v9.json")
    assert missing.status_code == 404
    assert missing.json()["errors"][0]["code"] == "NOT_FOUND"


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_peft_kind_yields_a_valid_adapter_config(case: str, tmp_path: Path) -> None:
    make_model, make_config, _expected = CASES[case]
    model = get_peft_model(make_model(), make_config())
    _perturb(model)
    model.save_pretrained(str(tmp_path / "adapter"), safe_serialization=True)
    imported = read_peft_directory(tmp_path / "adapter", base_fingerprint="sha256:" + "0" * 64)
    assert_document_is_the_model(imported)
    assert_valid_config(imported.config.model_dump(mode="json"), ADAPTER_CONFIG_MEDIA_TYPE)


def test_nola_and_base_configs_are_valid(tmp_path: Path) -> None:
    config, _directory = import_reference_checkpoint(
        reference_checkpoint(tmp_path / "ref.safetensors", init_a=True),
        tmp_path / "nola",
        lora_alpha=8.0,
        base_model_name_or_path="tiny-llama",
    )
    assert_valid_config(config.model_dump(mode="json"), ADAPTER_CONFIG_MEDIA_TYPE)

    tiny_llama().save_pretrained(str(tmp_path / "base"), safe_serialization=True)
    base = build_base_config(tmp_path / "base")
    assert_valid_config(base.model_dump(mode="json"), BASE_CONFIG_MEDIA_TYPE)


@pytest.mark.parametrize(
    ("change", "media_type"),
    [
        ({"kind": "mystery"}, ADAPTER_CONFIG_MEDIA_TYPE),
        ({"surprise": 1}, ADAPTER_CONFIG_MEDIA_TYPE),
        ({"rank": "four"}, ADAPTER_CONFIG_MEDIA_TYPE),
        ({"schema_version": 2}, BASE_CONFIG_MEDIA_TYPE),
    ],
)
def test_schemas_refuse_what_peftreg_would(change: dict[str, Any], media_type: str) -> None:
    adapter = {
        "kind": "lora",
        "base": {},
        "dtype": "F32",
        "parameters": 8,
        "bytes": 32,
        "tensors": [{"name": "a", "dtype": "F32", "shape": [2, 4]}],
        "peft_config": {},
    }
    base = {"fingerprint": "f", "structure_hash": "s", "parameters": 1, "tensors": []}
    document = {**(adapter if media_type == ADAPTER_CONFIG_MEDIA_TYPE else base)}
    assert_valid_config(document, media_type)
    with pytest.raises(AssertionError, match="does not match"):
        assert_valid_config({**document, **change}, media_type)
