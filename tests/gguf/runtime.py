"""The llama.cpp runtime the GGUF tests load files in: node-llama-cpp's prebuilt CPU binaries,
installed by the test setup (`npm ci --prefix tests/llamacpp --omit=optional`)."""

from __future__ import annotations

from pathlib import Path

from peftreg.gguf.runtime import LlamaCppRuntime

MODULES = Path(__file__).resolve().parents[1] / "llamacpp" / "node_modules"
INSTALL = "npm ci --prefix tests/llamacpp --omit=optional"


def llamacpp() -> LlamaCppRuntime:
    """The installed runtime; an error naming the install command when it is missing."""
    if not (MODULES / "node-llama-cpp").is_dir():
        raise RuntimeError(f"llama.cpp's runtime is not installed: run `{INSTALL}`")
    return LlamaCppRuntime.locate(MODULES)
