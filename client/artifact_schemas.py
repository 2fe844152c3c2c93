"""JSON schemas of the typed artifacts' config blobs, generated from their models.

The service publishes them at `/schemas/<name>` (see docs/artifact-spec.md), so
other tools can produce adapters, bases and checkpoints peftreg accepts.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from peftreg.adapters.schema import (
    ADAPTER_CONFIG_MEDIA_TYPE,
    BASE_CONFIG_MEDIA_TYPE,
    AdapterConfig,
    BaseConfig,
)

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_MEDIA_TYPE = "application/schema+json"
SCHEMA_PATH = "/schemas"


class UnknownSchema(LookupError):
    """No published schema has that name."""


def _models() -> dict[str, tuple[type[BaseModel], str]]:
    from peftreg.checkpoint.package import CHECKPOINT_CONFIG_MEDIA_TYPE, CheckpointConfig
    from peftreg.prompts.schema import PROMPT_CONFIG_MEDIA_TYPE, PromptConfig

    return {
        "adapter.config.v1.json": (AdapterConfig, ADAPTER_CONFIG_MEDIA_TYPE),
        "base.config.v1.json": (BaseConfig, BASE_CONFIG_MEDIA_TYPE),
        "checkpoint.config.v1.json": (CheckpointConfig, CHECKPOINT_CONFIG_MEDIA_TYPE),
        "prompt.config.v1.json": (PromptConfig, PROMPT_CONFIG_MEDIA_TYPE),
    }


def schema_names() -> list[str]:
    return sorted(_models())


def schema_for_media_type(media_type: str) -> str:
    """The published schema's name for a config media type."""
    for name, (_model, config_type) in _models().items():
        if config_type == media_type:
            return name
    raise UnknownSchema(f"no schema for config media type {media_type!r}")


def config_schema(name: str) -> dict[str, Any]:
    """The JSON schema (draft 2020-12) published as `/schemas/<name>`."""
    try:
        model, media_type = _models()[name]
    except KeyError:
        raise UnknownSchema(
            f"no schema named {name!r}; published: {', '.join(schema_names())}"
        ) from None
    schema = model.model_json_schema(mode="validation")
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        "$id": f"{SCHEMA_PATH}/{name}",
        "description": f"Config blob of media type {media_type}. {schema.get('description', '')}",
        **{key: value for key, value in schema.items() if key != "description"},
    }
