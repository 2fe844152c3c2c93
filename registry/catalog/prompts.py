"""Hard-prompt artifacts (`application/vnd.peftreg.prompt.v1`): validated at push, indexed.

The config parses as `PromptConfig`; the one layer, `prompt.txt`, is strict
UTF-8 within the size limit, its placeholders parse, and it is the config's
template byte for byte. When the config names a registered base's
fingerprint and a tokenizer binding, the binding's identity must be the one
the base manifest's tokenizer files hash to (from their digests: the
registry never runs a tokenizer); the prompt is then indexed as verified.
"""

from __future__ import annotations

import json

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from peftreg.digest import Digest
from peftreg.manifest import TITLE_ANNOTATION, ImageManifest
from peftreg.prompts.schema import (
    MAX_PROMPT_BYTES,
    PROMPT_FILE,
    PROMPT_KIND,
    PROMPT_TEXT_MEDIA_TYPE,
    PromptConfig,
)
from peftreg.prompts.template import PromptInvalid, decode_template, placeholders
from peftreg.prompts.tokenizer import TOKENIZER_FILES, tokenizer_identity
from peftreg.registry.catalog.artifacts import _blob_size, _read_json_config, _read_range
from peftreg.registry.db.models import ArtifactIndex, Manifest
from peftreg.registry.errors import ArtifactInvalid
from peftreg.registry.storage.base import BlobReader


def _config(data: bytes) -> PromptConfig:
    try:
        return PromptConfig.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "config"
        raise ArtifactInvalid(
            f"PromptConfig config invalid at {where}: {first['msg']}", detail={"location": where}
        ) from None


def _text(store: BlobReader, parsed: ImageManifest) -> str:
    layers = parsed.layers
    titles = [(layer.annotations or {}).get(TITLE_ANNOTATION) for layer in layers]
    if len(layers) != 1 or titles[0] != PROMPT_FILE:
        raise ArtifactInvalid(
            f"a hard prompt artifact has exactly one layer titled {PROMPT_FILE}, not {titles}"
        )
    layer = layers[0]
    if layer.media_type != PROMPT_TEXT_MEDIA_TYPE:
        raise ArtifactInvalid(
            f"{PROMPT_FILE} must be {PROMPT_TEXT_MEDIA_TYPE}, not {layer.media_type}"
        )
    size = _blob_size(store, layer.digest)
    if size > MAX_PROMPT_BYTES:
        raise ArtifactInvalid(
            f"{PROMPT_FILE} is {size} bytes; hard prompts are limited to {MAX_PROMPT_BYTES}",
            detail={"limit": MAX_PROMPT_BYTES},
        )
    data = _read_range(store, Digest.parse(layer.digest), 0, size)
    try:
        text = decode_template(data, label=PROMPT_FILE)
        placeholders(text)
    except PromptInvalid as exc:
        raise ArtifactInvalid(str(exc), detail={"layer": PROMPT_FILE}) from None
    return text


def _base_tokenizer_identity(session: Session, fingerprint: str) -> str | bool | None:
    """The registered base's tokenizer identity; None when it has no tokenizer files,
    False when no base of that fingerprint is registered."""
    content = session.scalars(
        select(Manifest.content)
        .join(ArtifactIndex, ArtifactIndex.manifest_id == Manifest.id)
        .where(ArtifactIndex.kind == "base", ArtifactIndex.fingerprint == fingerprint)
        .order_by(Manifest.id)
        .limit(1)
    ).first()
    if content is None:
        return False
    layers = json.loads(content).get("layers") or []
    files = {
        str((layer.get("annotations") or {}).get(TITLE_ANNOTATION)): str(layer.get("digest"))
        for layer in layers
    }
    if not any(name in files for name in TOKENIZER_FILES):
        return None
    return tokenizer_identity(files)


def inspect_prompt(session: Session, store: BlobReader, parsed: ImageManifest) -> ArtifactIndex:
    config = _config(_read_json_config(store, parsed.config))
    text = _text(store, parsed)
    if text != config.template:
        raise ArtifactInvalid(f"{PROMPT_FILE} is not the config's template")
    if config.placeholders != placeholders(text) or config.bytes != len(text.encode("utf-8")):
        raise ArtifactInvalid(
            f"the config's placeholders or size do not match {PROMPT_FILE}: it has "
            f"{placeholders(text)} and {len(text.encode('utf-8'))} bytes"
        )
    fingerprint = config.base.fingerprint if config.base is not None else None
    verified = False
    if fingerprint:
        identity = _base_tokenizer_identity(session, fingerprint)
        if identity is not False:
            if config.tokenizer is not None and config.tokenizer.identity != identity:
                raise ArtifactInvalid(
                    f"the prompt is bound to tokenizer {config.tokenizer.identity}, but the "
                    f"registered base {fingerprint} has tokenizer "
                    f"{identity or '(none: the base has no tokenizer files)'}",
                    detail={"location": "tokenizer"},
                )
            verified = True
    return ArtifactIndex(
        kind=PROMPT_KIND,
        base_fingerprint=fingerprint,
        base_structure_hash=config.base.structure_hash if config.base is not None else None,
        max_rank=None,
        base_quantization=None,
        verified=verified,
        fingerprint=None,
    )
