"""The check that an imported adapter's document is its validated model, byte for byte."""

from __future__ import annotations

from peftreg.adapters.package import config_blob
from peftreg.adapters.peft_import import ImportedAdapter


def assert_document_is_the_model(imported: ImportedAdapter) -> None:
    """A push uploads the document built without pydantic: it must be the blob the model
    would give (every field, every type), or the same adapter would change digest."""
    assert config_blob(imported.document) == config_blob(imported.config)
