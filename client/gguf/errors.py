"""The errors of writing GGUF files for llama.cpp."""

from __future__ import annotations

from peftreg.merge.errors import MergeError


class GgufUnsupported(MergeError):
    """A model, tokenizer or adapter that has no GGUF form here; the message says what is."""
