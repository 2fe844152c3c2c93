"""Perplexity of a model on a text, the same way for a checkpoint directory and a GGUF file.

The text is tokenized by the model's own tokenizer (transformers' for a
directory, llama.cpp's for a GGUF file), cut into windows of `window` tokens,
and each window is scored on its own: every token after the window's first
adds `-log p(token | the window before it)`. Perplexity is
`exp(total / count)`. A checkpoint directory (fp16, or INT4 compressed-tensors
with that package installed) runs in transformers on the CPU; a GGUF file runs
in llama.cpp itself (`peftreg.gguf.runtime`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from peftreg.sdk.errors import InvalidRequest


@dataclass(frozen=True)
class Perplexity:
    model: Path
    runtime: str  # "transformers" or "llama.cpp"
    tokens: int  # tokens of the text
    scored: int  # tokens scored (all but each window's first)
    nll: float  # summed negative log-likelihood, nats

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.scored) if self.scored else float("nan")


def _check_window(window: int) -> None:
    if window < 2:
        raise InvalidRequest(f"the window must hold at least 2 tokens, not {window}")


def transformers_perplexity(model_dir: Path, text: str, *, window: int = 256) -> Perplexity:
    """Perplexity of the Hugging Face model directory `model_dir` on `text` (CPU, fp32 math
    for fp16 weights where the CPU lacks fp16 kernels)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_window(window)
    if not (Path(model_dir) / "config.json").is_file():
        raise InvalidRequest(f"{model_dir} has no config.json; it is not a model directory")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # eval mode
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    total = 0.0
    scored = 0
    with torch.inference_mode():
        for start in range(0, max(len(ids) - 1, 0), window):
            part = torch.tensor([ids[start : start + window]])
            if part.shape[1] < 2:
                continue
            logits = model(part).logits[0, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits, part[0, 1:], reduction="sum")
            total += float(loss)
            scored += part.shape[1] - 1
    return Perplexity(Path(model_dir), "transformers", len(ids), scored, total)


def gguf_perplexity(
    model_file: Path, text: str, *, window: int = 256, modules: Path | None = None
) -> Perplexity:
    """Perplexity of the GGUF file `model_file` on `text`, computed by llama.cpp."""
    from peftreg.gguf.runtime import LlamaCppRuntime

    _check_window(window)
    runtime = LlamaCppRuntime.locate(modules)
    [answer] = runtime.run(
        Path(model_file), [{"kind": "perplexity", "text": text, "window": window}], context=window
    )
    return Perplexity(
        Path(model_file),
        "llama.cpp",
        int(answer["tokens"]),
        int(answer["count"]),
        float(answer["nll"]),
    )


def perplexity(
    path: Path, text: str, *, window: int = 256, modules: Path | None = None
) -> Perplexity:
    """A `.gguf` file through llama.cpp, a directory through transformers."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return gguf_perplexity(path, text, window=window, modules=modules)
    if path.is_dir():
        return transformers_perplexity(path, text, window=window)
    raise InvalidRequest(f"{path} is neither a model directory nor a .gguf file")


__all__ = ["Perplexity", "gguf_perplexity", "perplexity", "transformers_perplexity"]
