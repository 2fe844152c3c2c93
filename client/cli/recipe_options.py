"""The options that describe a merged checkpoint, shared by `peftreg merge` and `peftreg export`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

DTYPES = ("float16", "bfloat16", "float32")
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
        "--quantize",
        type=click.Choice(["none", "int4"]),
        default="none",
        show_default=True,
        help="int4: a compressed-tensors W4A16 (pack-quantized) checkpoint.",
    ),
    click.option("--group-size", type=int, default=128, show_default=True, help="INT4 group size."),
    click.option(
        "--algorithm",
        type=click.Choice(["rtn", "mse"]),
        default="rtn",
        show_default=True,
        help="INT4 scales: round-to-nearest, or a per-group search minimizing the error.",
    ),
)


def recipe_options(command: F) -> F:
    """--weight, --dtype, --base-quantization, --quantize, --group-size, --algorithm."""
    for option in reversed(_OPTIONS):
        command = option(command)
    return command
