"""The config blob of a hard-prompt artifact (`application/vnd.peftreg.prompt.v1`).

A hard prompt is a text template: the config records it whole (so `show`
prints it without a download), its placeholders, and, when it was pushed
against a base or a tokenizer, that tokenizer's identity and the template's
token count under it. The one layer, `prompt.txt`, is the same text, so
`pull` writes the file back as it was pushed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from peftreg.adapters.schema import BaseReference

PROMPT_CONFIG_MEDIA_TYPE = "application/vnd.peftreg.prompt.config.v1+json"
PROMPT_TEXT_MEDIA_TYPE = "text/plain"
PROMPT_FILE = "prompt.txt"
PROMPT_KIND = "hard_prompt"
MAX_PROMPT_BYTES = 64 * 1024


class TokenizerBinding(BaseModel):
    """The tokenizer a prompt was counted with."""

    model_config = ConfigDict(extra="forbid")

    identity: str = Field(
        description="sha256 over the canonical JSON of the sorted [file name, file digest] "
        "pairs of the tokenizer's files (tokenizer.json, tokenizer_config.json, ...)"
    )
    files: list[str] = Field(description="the tokenizer files the identity covers")
    token_count: int = Field(description="tokens of the template as written, no special tokens")


class PromptConfig(BaseModel):
    """Config blob of an `application/vnd.peftreg.prompt.v1` artifact."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    kind: Literal["hard_prompt"] = "hard_prompt"
    template: str = Field(description="the prompt text, UTF-8, as in prompt.txt")
    placeholders: list[str] = Field(
        default_factory=list, description="`{name}` fields of the template, in order"
    )
    bytes: int = Field(description="size of prompt.txt")
    base: BaseReference | None = Field(
        default=None, description="the registered base whose tokenizer it is bound to"
    )
    tokenizer: TokenizerBinding | None = None
