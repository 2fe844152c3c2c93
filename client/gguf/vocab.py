"""The tokenizer of a GGUF model (`tokenizer.ggml.*`), from the base's tokenizer.json.

Supported: byte-level BPE tokenizers (GPT-2 style: Llama 3, Qwen2, and any
`tokenizers` ByteLevel BPE), written as llama.cpp's `gpt2` tokenizer model
with the pre-tokenizer named from tokenizer.json's own regex
(`PRE_TOKENIZERS`: llama.cpp keys its pre-tokenizer by name, so a regex it
does not know is refused rather than guessed). The token list is the
vocabulary in id order, then added tokens (special ones as CONTROL, others
USER_DEFINED), padded to the model's `vocab_size` with UNUSED `[PAD<i>]`
tokens as convert_hf_to_gguf.py does. Merges, the special token ids and the
`add_bos` / `add_eos` flags come from the `gguf` package's `SpecialVocab`.
SentencePiece tokenizers are refused for now.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from peftreg.gguf.errors import GgufUnsupported

TOKENIZER_FILE = "tokenizer.json"
LLAMA3_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
QWEN2_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
# tokenizer.json Split regex -> llama.cpp pre-tokenizer name
PRE_TOKENIZERS = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}


@dataclass(frozen=True)
class GgufVocab:
    tokens: list[str]
    types: list[int]
    pre: str
    special: gguf.SpecialVocab

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        self.special.add_to_gguf(writer, quiet=True)


def _pre_tokenizer(document: dict[str, Any]) -> str:
    pre = document.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        splits = [p for p in parts if p.get("type") == "Split"]
        levels = [p for p in parts if p.get("type") == "ByteLevel"]
        if len(splits) == 1 and len(levels) == 1 and len(parts) == 2:
            regex = (splits[0].get("pattern") or {}).get("Regex")
            if regex in PRE_TOKENIZERS:
                return PRE_TOKENIZERS[regex]
    raise GgufUnsupported(
        "the base's tokenizer.json pre-tokenizer is not one llama.cpp knows by name (GPT-2 "
        "byte-level, Llama 3 or Qwen2 regex); GGUF export cannot name it"
    )


def read_vocab(base_dir: Path, vocab_size: int) -> GgufVocab:
    """The GGUF tokenizer of the base in `base_dir`, padded to `vocab_size` tokens."""
    path = Path(base_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise GgufUnsupported(
            f"the base has no {TOKENIZER_FILE}; GGUF export needs a fast (byte-level BPE) tokenizer"
        )
    document = json.loads(path.read_text(encoding="utf-8"))
    model = document.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise GgufUnsupported(
            f"the base's tokenizer is {model.get('type')}"
            f"{' with byte fallback (SentencePiece style)' if model.get('byte_fallback') else ''}"
            "; GGUF export supports byte-level BPE tokenizers"
        )
    pre = _pre_tokenizer(document)
    by_id: dict[int, tuple[str, int]] = {
        int(index): (text, int(gguf.TokenType.NORMAL)) for text, index in model["vocab"].items()
    }
    for added in document.get("added_tokens") or []:
        added_kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[int(added["id"])] = (str(added["content"]), int(added_kind))
    size = max(vocab_size, max(by_id) + 1)
    if size != vocab_size:
        raise GgufUnsupported(
            f"the tokenizer has {size} tokens but the model's vocab_size is {vocab_size}"
        )
    tokens: list[str] = []
    types: list[int] = []
    for index in range(size):
        text, kind = by_id.get(index, (f"[PAD{index}]", int(gguf.TokenType.UNUSED)))
        tokens.append(text)
        types.append(kind)
    special = gguf.SpecialVocab(Path(base_dir), load_merges=True, n_vocab=size)
    if not special.merges:
        raise GgufUnsupported(f"the base's {TOKENIZER_FILE} has no BPE merges")
    return GgufVocab(tokens, types, pre, special)


__all__ = ["PRE_TOKENIZERS", "GgufVocab", "read_vocab"]
