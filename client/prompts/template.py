"""Prompt templates: strict UTF-8 text with `{name}` placeholders (Python format fields).

A placeholder is a bare identifier in braces; `{{` and `}}` are literal braces.
Attribute or index access, conversions and format specs are refused, so rendering
never reaches beyond the values given.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping

from peftreg.prompts.schema import MAX_PROMPT_BYTES
from peftreg.sdk.errors import InvalidRequest

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class PromptInvalid(InvalidRequest):
    """A prompt file or template that cannot be stored or rendered; the message says why."""


def decode_template(data: bytes, *, label: str = "the prompt") -> str:
    """The template in `data`: at most MAX_PROMPT_BYTES of strict UTF-8, not empty, no NUL."""
    if len(data) > MAX_PROMPT_BYTES:
        raise PromptInvalid(
            f"{label} is {len(data)} bytes; hard prompts are limited to {MAX_PROMPT_BYTES}"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PromptInvalid(
            f"{label} is not UTF-8: byte {exc.start} ({data[exc.start : exc.start + 1]!r})"
        ) from None
    if not text.strip():
        raise PromptInvalid(f"{label} is empty")
    if "\x00" in text:
        raise PromptInvalid(f"{label} holds a NUL character at {text.index(chr(0))}")
    return text


def placeholders(text: str) -> list[str]:
    """The template's `{name}` fields, each once, in order of first appearance."""
    found: list[str] = []
    try:
        fields = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise PromptInvalid(
            f"the template's braces do not parse ({exc}); write {{{{ or }}}} for a literal brace"
        ) from None
    for _literal, name, spec, conversion in fields:
        if name is None:
            continue
        if not IDENTIFIER.fullmatch(name) or spec or conversion:
            shown = (
                "{"
                + name
                + (f"!{conversion}" if conversion else "")
                + (f":{spec}" if spec else "")
                + "}"
            )
            raise PromptInvalid(
                f"placeholder {shown} is not a bare {{name}} (letters, digits, underscore); "
                "write {{ or }} for a literal brace"
            )
        if name not in found:
            found.append(name)
    return found


def render(text: str, values: Mapping[str, str]) -> str:
    """The template with every placeholder replaced; all must be given, and no others."""
    names = placeholders(text)
    missing = [name for name in names if name not in values]
    if missing:
        raise PromptInvalid(f"no value for placeholder(s) {', '.join(missing)}")
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise PromptInvalid(
            f"the template has no placeholder(s) {', '.join(unknown)} "
            f"(it has: {', '.join(names) or 'none'})"
        )
    return text.format_map({name: str(values[name]) for name in names})


__all__ = ["PromptInvalid", "decode_template", "placeholders", "render"]
