from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from peftreg.registry.settings import Settings
from peftreg.registry.storage.base import BlobStore
from peftreg.registry.storage.factory import open_blob_store
from tests.fixtures.seaweed import SeaweedS3, run_seaweed

# Exercised with a prefix that lacks its trailing slash, to cover normalisation.
S3_PREFIX = "registry"

SettingsFactory = Callable[..., Settings]


@pytest.fixture(scope="session")
def seaweed() -> Iterator[SeaweedS3]:
    with run_seaweed() as server:
        yield server


@pytest.fixture
def s3_bucket(seaweed: SeaweedS3) -> Iterator[str]:
    """A fresh, empty bucket, removed with its contents afterwards."""
    name = seaweed.create_bucket()
    yield name
    seaweed.delete_bucket(name)


@pytest.fixture
def s3_settings(seaweed: SeaweedS3, s3_bucket: str, tmp_path: Path) -> SettingsFactory:
    """Settings for the S3 backend on the fresh bucket; keyword arguments override."""

    def make(**overrides: Any) -> Settings:
        fields: dict[str, Any] = {
            "home": tmp_path / "home",
            "storage": "s3",
            "s3_endpoint_url": seaweed.endpoint_url,
            "s3_bucket": s3_bucket,
            "s3_prefix": S3_PREFIX,
            "s3_region": seaweed.region,
            "s3_access_key_id": seaweed.access_key_id,
            "s3_secret_access_key": seaweed.secret_access_key,
            "s3_redirect": False,
        }
        fields.update(overrides)
        return Settings(**fields)

    return make


@pytest.fixture(params=["filesystem", pytest.param("s3", marks=pytest.mark.s3)])
def store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Settings selecting each backend; open them twice to get two 'replicas'."""
    if request.param == "filesystem":
        return Settings(
            home=tmp_path / "home", storage="filesystem", storage_path=tmp_path / "blobs"
        )
    make: SettingsFactory = request.getfixturevalue("s3_settings")
    return make()


@pytest.fixture
def blob_store(store_settings: Settings) -> BlobStore:
    return open_blob_store(store_settings)
