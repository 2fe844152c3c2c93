"""A tokenizer's identity (a digest over its files) and token counts under it.

The identity is what binds a prompt to a base: it is computed from file digests
alone, so the registry checks a prompt against a registered base's manifest
without reading or running the tokenizer. Counting tokens runs the tokenizer's
`tokenizer.json` with the `tokenizers` package (a dependency of transformers).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from peftreg.digest import digest_file
from peftreg.manifest import canonical_json
from peftreg.sdk.errors import InvalidRequest

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
TOKENIZER_JSON = "tokenizer.json"


def tokenizer_identity(files: Mapping[str, str]) -> str:
    """sha256 over canonical JSON of the sorted [name, digest] pairs of the tokenizer files."""
    pairs = sorted([name, str(digest)] for name, digest in files.items() if name in TOKENIZER_FILES)
    if not pairs:
        raise InvalidRequest("no tokenizer files (tokenizer.json, ...) to identify")
    return "sha256:" + hashlib.sha256(canonical_json(pairs)).hexdigest()


def directory_tokenizer_files(directory: Path) -> dict[str, str]:
    """name -> sha256 digest of the tokenizer files in a local directory."""
    if not directory.is_dir():
        raise InvalidRequest(f"{directory} is not a directory")
    files = {
        name: str(digest_file(directory / name)[0])
        for name in TOKENIZER_FILES
        if (directory / name).is_file()
    }
    if TOKENIZER_JSON not in files:
        raise InvalidRequest(
            f"{directory} has no {TOKENIZER_JSON}: a prompt binds to a fast tokenizer's "
            f"{TOKENIZER_JSON}"
        )
    return files


def encode(tokenizer_json: Path, text: str) -> list[int]:
    """The token ids of `text` as written (no special tokens added)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise InvalidRequest(
            "counting tokens needs the tokenizers package (pip install tokenizers, or "
            "'peftreg[worker]')"
        ) from None
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_json))
    except Exception as exc:  # the library raises its own Exception subclasses
        raise InvalidRequest(f"{tokenizer_json.name} does not load as a tokenizer: {exc}") from None
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


__all__ = [
    "TOKENIZER_FILES",
    "directory_tokenizer_files",
    "encode",
    "tokenizer_identity",
]
