"""The options that describe a merged checkpoint, shared by `peftreg merge` and `peftreg export`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from peftreg.gguf.formats import GGUF_QUANTIZATIONS

DTYPES = ("float16", "bfloat16", "float32")
CALIBRATED = ("gptq", "awq")  # INT4 algorithms that calibrate (llm-compressor)
F = TypeVar("F", bound=Callable[..., Any])

_OPTIONS = (
    click.option(
        "--weight",
        "weights",
        multiple=True,
        type=float,
        help="Weight of each adapter in a weighted sum, once per adapter in order (default 1).",
    ),
    click.option("--dtype", type=click.Choice(DTYPES), help="Output dtype (default: the base's)."),
    click.option(
        "--base-quantization",
        type=click.Choice(["none", "nf4"]),
        default="none",
        show_default=True,
        help="nf4: merge a QLoRA adapter into the NF4-dequantized base it was trained against.",
    ),
    click.option(
        "--format",
        "output_format",
        type=click.Choice(["safetensors", "gguf"]),
        default="safetensors",
        show_default=True,
        help="safetensors: a Hugging Face model directory; gguf: one GGUF file for llama.cpp "
        "and Ollama (Llama and Qwen2 bases).",
    ),
    click.option(
        "--quantize",
        type=click.Choice(["none", "int4", *GGUF_QUANTIZATIONS]),
        default="none",
        show_default=True,
        help="safetensors: int4 (compressed-tensors W4A16, pack-quantized); gguf: "
        f"{'|'.join(GGUF_QUANTIZATIONS)} (llama.cpp types; default f16).",
    ),
    click.option("--group-size", type=int, default=128, show_default=True, help="INT4 group size."),
    click.option(
        "--algorithm",
        type=click.Choice(["rtn", "mse", *CALIBRATED]),
        default="rtn",
        show_default=True,
        help="INT4: rtn (round-to-nearest), mse (a per-group scale search), or gptq / awq "
        "(llm-compressor, calibrated on --calibration).",
    ),
    click.option(
        "--calibration",
        metavar="REF",
        help='gptq/awq: calibration text, a pushed text or JSONL artifact (one {"text": ...} '
        "per line); `peftreg merge` also takes a local file.",
    ),
    click.option(
        "--calibration-samples",
        type=click.IntRange(1, 4096),
        help="gptq/awq: calibration windows (default 128).",
    ),
    click.option(
        "--max-sequence-length",
        type=click.IntRange(16, 32768),
        help="gptq/awq: tokens per calibration window (default 512).",
    ),
)


def check_calibration(quantize: str, algorithm: str, calibration: str | None) -> None:
    """UsageError unless gptq/awq come with --quantize int4 and --calibration, and
    --calibration only with them."""
    if algorithm in CALIBRATED:
        if quantize != "int4":
            raise click.UsageError(f"--algorithm {algorithm} applies to --quantize int4")
        if calibration is None:
            raise click.UsageError(
                f"--algorithm {algorithm} needs --calibration (a text or JSONL artifact)"
            )
    elif calibration is not None:
        raise click.UsageError("--calibration applies to --algorithm gptq or awq")


def check_format(output_format: str, quantize: str, dtype: str | None) -> str:
    """The quantization a (format, --quantize, --dtype) choice means; UsageError if none."""
    if output_format == "gguf":
        if dtype is not None:
            raise click.UsageError("--format gguf sets tensor types with --quantize, not --dtype")
        if quantize == "none":
            return "f16"
        if quantize not in GGUF_QUANTIZATIONS:
            raise click.UsageError(
                f"--format gguf takes --quantize {'|'.join(GGUF_QUANTIZATIONS)}, not {quantize}"
            )
        return quantize
    if quantize not in ("none", "int4"):
        raise click.UsageError(f"--quantize {quantize} is a GGUF type: add --format gguf")
    return quantize


def recipe_options(command: F) -> F:
    """--weight, --dtype, --base-quantization, --format, --quantize, --group-size,
    --algorithm, --calibration, --calibration-samples, --max-sequence-length."""
    for option in reversed(_OPTIONS):
        command = option(command)
    return command
