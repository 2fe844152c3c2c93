"""`peftreg eval`: perplexity of a checkpoint directory or a GGUF file on a text file."""

from __future__ import annotations

from pathlib import Path

import click

from peftreg.cli.common import echo_json


@click.command("eval")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--text",
    "text_file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="UTF-8 text to score.",
)
@click.option("--window", type=int, default=256, show_default=True, help="Tokens per window.")
@click.option(
    "--llamacpp-modules",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="GGUF: the node_modules folder holding node-llama-cpp (default: "
    "$PEFTREG_LLAMACPP_MODULES).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def evaluate(
    path: Path, text_file: Path, window: int, llamacpp_modules: Path | None, as_json: bool
) -> None:
    """Perplexity of PATH (a model directory, or a .gguf file run in llama.cpp) on --text.

    Compare exports of one model on the same text and window: lower is better.
    """
    from peftreg.quality.perplexity import perplexity

    text = text_file.read_text(encoding="utf-8")
    result = perplexity(path, text, window=window, modules=llamacpp_modules)
    if as_json:
        echo_json(
            {
                "model": str(result.model),
                "runtime": result.runtime,
                "tokens": result.tokens,
                "scored": result.scored,
                "nll": result.nll,
                "perplexity": result.perplexity,
            }
        )
        return
    click.echo(
        f"perplexity {result.perplexity:.4f} over {result.scored} tokens "
        f"({result.runtime}, window {window}) of {path}"
    )
