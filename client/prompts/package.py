"""Hard-prompt artifacts: build and push one from a text file, load one back.

An artifact (artifactType PROMPT_ARTIFACT) has the `PromptConfig` as its config
blob and one layer, `prompt.txt` (`text/plain`), the template's bytes; manifest
annotations `io.peftreg.adapter.kind` = `hard_prompt` and, when bound, the token
count (`io.peftreg.prompt.tokens`). Pushed with a registered base, the prompt
is bound to the base's tokenizer files (their digests in the base manifest); the
registry checks that binding when it stores the prompt.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftreg.adapters.schema import BaseReference
from peftreg.digest import Digest, digest_file
from peftreg.manifest import OCI_MANIFEST, PROMPT_ARTIFACT, TITLE_ANNOTATION, canonical_json
from peftreg.prompts.schema import (
    PROMPT_CONFIG_MEDIA_TYPE,
    PROMPT_FILE,
    PROMPT_TEXT_MEDIA_TYPE,
    PromptConfig,
    TokenizerBinding,
)
from peftreg.prompts.template import PromptInvalid, decode_template, placeholders, render
from peftreg.prompts.tokenizer import (
    TOKENIZER_FILES,
    TOKENIZER_JSON,
    directory_tokenizer_files,
    encode,
    tokenizer_identity,
)
from peftreg.reference import Reference
from peftreg.sdk.client import Client
from peftreg.sdk.errors import InvalidRequest
from peftreg.transfer.push import LocalFile, build_manifest

KIND_ANNOTATION = "io.peftreg.adapter.kind"
TOKENS_ANNOTATION = "io.peftreg.prompt.tokens"


@dataclass(frozen=True)
class Tokenizer:
    """Where a tokenizer's files are (tokenizer.json readable) and their digests."""

    files: dict[str, str]  # name -> sha256 digest
    tokenizer_json: Path

    @property
    def identity(self) -> str:
        return tokenizer_identity(self.files)


def local_tokenizer(directory: Path) -> Tokenizer:
    """The tokenizer of a local model or tokenizer directory."""
    return Tokenizer(directory_tokenizer_files(directory), directory / TOKENIZER_JSON)


def base_tokenizer(client: Client, base: str) -> Tokenizer:
    """The tokenizer files of the registered base REF `base` (tokenizer.json downloaded)."""
    reference = Reference.parse(base)
    manifest = json.loads(client.get_manifest(reference).content)
    layers = {
        str((layer.get("annotations") or {}).get(TITLE_ANNOTATION)): layer
        for layer in manifest.get("layers") or []
    }
    files = {name: str(layers[name]["digest"]) for name in TOKENIZER_FILES if name in layers}
    if TOKENIZER_JSON not in files:
        raise InvalidRequest(
            f"{base} has no {TOKENIZER_JSON} layer: push the base with its tokenizer "
            "(`peftreg base push` takes tokenizer files from the model directory)"
        )
    layer = layers[TOKENIZER_JSON]
    path = client.download_blob(reference.repository, layer["digest"], int(layer["size"]))
    return Tokenizer(files, path)


def build_prompt_config(
    text: str, *, base: BaseReference | None = None, tokenizer: Tokenizer | None = None
) -> PromptConfig:
    """The config of a template (already decoded), bound to `tokenizer` when given."""
    binding = None
    if tokenizer is not None:
        binding = TokenizerBinding(
            identity=tokenizer.identity,
            files=sorted(tokenizer.files),
            token_count=len(encode(tokenizer.tokenizer_json, text)),
        )
    return PromptConfig(
        template=text,
        placeholders=placeholders(text),
        bytes=len(text.encode("utf-8")),
        base=base,
        tokenizer=binding,
    )


def push_prompt(
    client: Client,
    path: Path,
    reference: Reference | str,
    *,
    base_ref: str | None = None,
    tokenizer_dir: Path | None = None,
    annotations: Mapping[str, str] | None = None,
) -> tuple[Digest, PromptConfig]:
    """Push the text file `path` as a hard prompt; bound to the registered base `base_ref`'s
    tokenizer (and, with `tokenizer_dir` too, refused unless that is the same tokenizer)
    or to `tokenizer_dir`'s."""
    ref = reference if isinstance(reference, Reference) else Reference.parse(reference)
    if not path.is_file():
        raise PromptInvalid(f"{path} is not a file: a hard prompt is one text file")
    text = decode_template(path.read_bytes(), label=str(path))
    base = client.base_reference(base_ref) if base_ref else None
    tokenizer = base_tokenizer(client, base_ref) if base_ref else None
    if tokenizer_dir is not None:
        local = local_tokenizer(tokenizer_dir)
        if tokenizer is not None and local.identity != tokenizer.identity:
            raise InvalidRequest(
                f"the tokenizer in {tokenizer_dir} ({local.identity}) is not the base "
                f"{base_ref}'s ({tokenizer.identity})"
            )
        tokenizer = tokenizer or local
    config = build_prompt_config(text, base=base, tokenizer=tokenizer)
    config_bytes = canonical_json(config.model_dump(mode="json"))
    digest, size = digest_file(path)
    layer = LocalFile(PROMPT_FILE, path, digest, size, PROMPT_TEXT_MEDIA_TYPE)
    client.upload_blob(ref.repository, config_bytes)
    client.upload_blob(ref.repository, path, digest)
    notes = {KIND_ANNOTATION: config.kind, TITLE_ANNOTATION: path.name}
    if config.tokenizer is not None:
        notes[TOKENS_ANNOTATION] = str(config.tokenizer.token_count)
    manifest = build_manifest(
        [layer],
        PROMPT_ARTIFACT,
        {**notes, **(annotations or {})},
        (PROMPT_CONFIG_MEDIA_TYPE, config_bytes),
    )
    return client.put_manifest(ref, manifest, OCI_MANIFEST), config


@dataclass(frozen=True)
class HardPrompt:
    """A pulled hard prompt: its text, placeholders and tokenizer binding."""

    reference: str
    digest: str
    config: PromptConfig

    @property
    def text(self) -> str:
        return self.config.template

    @property
    def placeholders(self) -> list[str]:
        return list(self.config.placeholders)

    @property
    def token_count(self) -> int | None:
        return None if self.config.tokenizer is None else self.config.tokenizer.token_count

    def render(self, **values: Any) -> str:
        """The text with every `{name}` replaced (all of them, and no others)."""
        return render(self.text, {name: str(value) for name, value in values.items()})

    def token_ids(self, tokenizer_dir: Path | str, **values: Any) -> list[int]:
        """The ids of the text (rendered with `values`, if any) under the tokenizer in
        `tokenizer_dir`, which must be the one the prompt is bound to."""
        tokenizer = local_tokenizer(Path(tokenizer_dir))
        binding = self.config.tokenizer
        if binding is not None and tokenizer.identity != binding.identity:
            raise InvalidRequest(
                f"{self.reference} is bound to tokenizer {binding.identity}; the one in "
                f"{tokenizer_dir} is {tokenizer.identity}"
            )
        text = self.render(**values) if values or self.placeholders else self.text
        return encode(tokenizer.tokenizer_json, text)


def load_prompt(client: Client, reference: Reference | str) -> HardPrompt:
    """The hard prompt REF names (its config blob; the text is in it)."""
    ref = reference if isinstance(reference, Reference) else Reference.parse(reference)
    response = client.get_manifest(ref)
    manifest = json.loads(response.content)
    config = manifest.get("config") or {}
    if (
        manifest.get("artifactType") != PROMPT_ARTIFACT
        or config.get("mediaType") != PROMPT_CONFIG_MEDIA_TYPE
    ):
        raise InvalidRequest(f"{ref} is not a hard prompt artifact")
    parsed = PromptConfig.model_validate_json(client.get_blob(ref.repository, config["digest"]))
    return HardPrompt(str(ref), str(response.digest), parsed)


__all__ = [
    "HardPrompt",
    "Tokenizer",
    "base_tokenizer",
    "build_prompt_config",
    "load_prompt",
    "local_tokenizer",
    "push_prompt",
]
