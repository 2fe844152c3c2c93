"""`peftreg merge`: adapters merged into a local base model directory, without a server."""

from __future__ import annotations

import math
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import click

from peftreg.cli.common import echo_json, human_size
from peftreg.cli.recipe_options import check_calibration, check_format, recipe_options
from peftreg.merge.errors import MergeError

if TYPE_CHECKING:  # torch is imported only when a merge runs, never by `peftreg --help`
    import torch

    from peftreg.checkpoint.encoding import TensorEncoder
    from peftreg.merge.inputs import AdapterInput
    from peftreg.merge.stream import MergeResult

SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str) -> int:
    """`5GB` (10^9 bytes, as transformers counts), `500MiB`, `1024`: a byte count."""
    match = _SIZE.match(text)
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in SIZE_UNITS:
        raise click.BadParameter(f"{text!r} is not a size like 5GB, 500MiB or 1000000")
    size = int(float(match.group(1)) * SIZE_UNITS[unit])
    if size <= 0:
        raise click.BadParameter(f"{text!r} must be positive")
    return size


@contextmanager
def single_threaded_cpu_merge(enabled: bool) -> Iterator[None]:
    """torch on one intra-op thread for the block, then its setting restored.

    A plain merge on the CPU is a stream of small memory-bound operations (row
    blocks of a few MB); spreading each over threads costs a synchronization
    per operation, which on a busy machine made a 1 GB merge several times
    slower. The setting is process-wide, so only the CLI (which owns its
    process) makes it; the library never does.
    """
    if not enabled:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def check_weights(weights: tuple[float, ...], adapters: int) -> None:
    """One finite --weight per adapter, or none at all."""
    if weights and len(weights) != adapters:
        raise click.UsageError(
            f"{len(weights)} --weight values for {adapters} adapters; give one per adapter"
        )
    for weight in weights:
        if not math.isfinite(weight):
            raise click.BadParameter(f"{weight} is not a finite number", param_hint="--weight")


def int4_encoder(base_dir: Path, group_size: int, algorithm: str) -> TensorEncoder:
    """The INT4 (compressed-tensors pack-quantized) encoder for the base's architecture,
    imported only when asked for."""
    from peftreg.merge.model_dir import read_model_config

    try:
        from peftreg.quantize import Int4Encoder
    except ImportError as exc:
        raise MergeError(f"--quantize int4 is not available in this installation: {exc}") from None
    model_config = read_model_config(base_dir)
    encoder: TensorEncoder = Int4Encoder.for_model_config(
        model_config, group_size=group_size, algorithm="mse" if algorithm == "mse" else "rtn"
    )
    return encoder


class _Bar:
    """A stderr progress bar driven by merge's (fraction, tensor name) callback."""

    STEPS = 1000

    def __init__(self) -> None:
        self._bar: Any = click.progressbar(length=self.STEPS, label="merge", file=sys.stderr)
        self._bar.__enter__()
        self._shown = 0

    def __call__(self, fraction: float, _name: str) -> None:
        step = min(self.STEPS, int(fraction * self.STEPS))
        if step > self._shown:
            self._bar.update(step - self._shown)
            self._shown = step

    def close(self) -> None:
        self._bar.__exit__(None, None, None)


def _print_result(
    as_json: bool, fields: dict[str, Any], summary: str, notes: Sequence[str] = ()
) -> None:
    """One merge's outcome: `fields` as JSON, or the notes on stderr and the one-line
    summary on stdout."""
    if as_json:
        echo_json(fields)
        return
    for note in notes:
        click.echo(f"note: {note}", err=True)
    click.echo(summary)


def _report(result: MergeResult, as_json: bool) -> None:
    _print_result(
        as_json,
        {
            "output": str(result.output),
            "shards": result.shards,
            "tensors": result.tensors,
            "bytes": result.bytes_written,
            "merged_modules": result.merged_modules,
            "seconds": round(result.seconds, 3),
            "device": result.device,
            "recipe": result.recipe,
            "notes": result.notes,
        },
        f"merged {len(result.recipe['adapters'])} adapter(s), {result.merged_modules} modules, "
        f"into {result.output}: {result.tensors} tensors, {human_size(result.bytes_written)} "
        f"in {len(result.shards)} shard(s), {result.seconds:.1f} s on {result.device}",
        result.notes,
    )


@click.command()
@click.argument(
    "adapters",
    nargs=-1,
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
)
@click.option(
    "--base",
    "base_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The base model directory (config.json, tokenizer, safetensors shards).",
)
@click.option(
    "--output",
    "-o",
    required=True,
    type=click.Path(path_type=Path),
    help="Directory to write (--format gguf: the .gguf file).",
)
@recipe_options
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where to compute (auto: CUDA when available).",
)
@click.option(
    "--max-shard-size",
    default="5GB",
    show_default=True,
    help="Largest output shard, e.g. 5GB (5 * 10^9 bytes, as transformers counts), 500MiB.",
)
@click.option("--force", is_flag=True, help="Replace a non-empty output directory.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def merge(
    adapters: tuple[Path, ...],
    base_dir: Path,
    output: Path,
    weights: tuple[float, ...],
    dtype: str | None,
    base_quantization: Literal["none", "nf4"],
    output_format: str,
    quantize: str,
    group_size: int,
    algorithm: str,
    calibration: str | None,
    calibration_samples: int | None,
    max_sequence_length: int | None,
    device: str,
    max_shard_size: str,
    force: bool,
    quiet: bool,
    as_json: bool,
) -> None:
    """Merge the PEFT adapter directories ADAPTERS (summed with --weight) into the base.

    Streams the base one tensor at a time and writes a Hugging Face model
    directory at OUTPUT (config.json, tokenizer files, safetensors shards), or
    with --format gguf one GGUF file for llama.cpp and Ollama.
    """
    check_weights(weights, len(adapters))
    quantize = check_format(output_format, quantize, dtype)
    check_calibration(quantize, algorithm, calibration)
    if output_format == "gguf":
        _merge_gguf(
            adapters,
            base_dir,
            output,
            weights,
            base_quantization,
            quantize,
            device,
            force,
            quiet,
            as_json,
        )
        return
    import torch

    from peftreg.merge.inputs import adapter_from_peft_directory
    from peftreg.merge.stream import merge_to_directory, resolve_device

    max_shard_bytes = parse_size(max_shard_size)
    inputs = [
        adapter_from_peft_directory(path, weight=weights[index] if weights else 1.0)
        for index, path in enumerate(adapters)
    ]
    if calibration is not None:
        _merge_calibrated(
            base_dir,
            inputs,
            output,
            CalibratedChoice(
                algorithm,
                group_size,
                calibration,
                calibration_samples,
                max_sequence_length,
            ),
            dtype=getattr(torch, dtype) if dtype else None,
            base_quantization=base_quantization,
            device=device,
            force=force,
            as_json=as_json,
        )
        return
    encoder = int4_encoder(base_dir, group_size, algorithm) if quantize == "int4" else None
    # One intra-op thread for a plain CPU merge (see single_threaded_cpu_merge); INT4's
    # scale search is compute-bound and keeps torch's threads.
    single = encoder is None and resolve_device(device).type == "cpu"
    bar = _Bar() if not quiet and not as_json and sys.stderr.isatty() else None
    try:
        with single_threaded_cpu_merge(single):
            result = merge_to_directory(
                base_dir,
                inputs,
                output,
                dtype=getattr(torch, dtype) if dtype else None,
                base_quantization=base_quantization,
                encoder=encoder,
                device=device,
                max_shard_bytes=max_shard_bytes,
                progress=bar,
                replace=force,
            )
    finally:
        if bar is not None:
            bar.close()
    _report(result, as_json)


@dataclass(frozen=True)
class CalibratedChoice:
    """What `--algorithm gptq|awq` asked for."""

    algorithm: str
    group_size: int
    calibration: str
    samples: int | None
    max_sequence_length: int | None


def _merge_calibrated(
    base_dir: Path,
    inputs: Sequence[AdapterInput],
    output: Path,
    choice: CalibratedChoice,
    *,
    dtype: torch.dtype | None,
    base_quantization: Literal["none", "nf4"],
    device: str,
    force: bool,
    as_json: bool,
) -> None:
    """Merge dense into a scratch directory beside the output, then GPTQ/AWQ it into the
    output (`peftreg.quantize.calibrated`); the scratch directory is removed either way."""
    from peftreg.checkpoint.writer import check_output
    from peftreg.cli.calibration_input import read_calibration
    from peftreg.merge.destination import check_destination
    from peftreg.merge.stream import merge_to_directory
    from peftreg.quantize.calibrated import (
        DEFAULT_MAX_SEQUENCE_LENGTH,
        DEFAULT_SAMPLES,
        CalibrationSettings,
        quantize_calibrated,
    )

    output = output.absolute()
    check_destination(output, base_dir, inputs)
    check_output(output, replace=force)
    settings = CalibrationSettings(
        samples=choice.samples or DEFAULT_SAMPLES,
        max_sequence_length=choice.max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH,
    )
    documents, source = read_calibration(choice.calibration)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.dense-", dir=output.parent) as scratch:
        merged = merge_to_directory(
            base_dir,
            inputs,
            Path(scratch) / "merged",
            dtype=dtype,
            base_quantization=base_quantization,
            device=device,
        )
        result = quantize_calibrated(
            merged.output,
            output,
            documents,
            algorithm=choice.algorithm,
            group_size=choice.group_size,
            settings=settings,
            calibration=source,
            replace=force,
        )
    recipe = {**merged.recipe, "encoding": result.recipe}
    seconds = merged.seconds + result.seconds
    _print_result(
        as_json,
        {
            "output": str(result.output),
            "merged_modules": merged.merged_modules,
            "seconds": round(seconds, 3),
            "device": merged.device,
            "recipe": recipe,
            "notes": merged.notes,
        },
        f"merged {len(inputs)} adapter(s), {merged.merged_modules} modules, and quantized them "
        f"with {choice.algorithm} (INT4 g{choice.group_size}, {result.samples} calibration "
        f"windows, {result.tokens} tokens) into {result.output} in {seconds:.1f} s",
        merged.notes,
    )


def _merge_gguf(
    adapters: tuple[Path, ...],
    base_dir: Path,
    output: Path,
    weights: tuple[float, ...],
    base_quantization: Literal["none", "nf4"],
    quantization: str,
    device: str,
    force: bool,
    quiet: bool,
    as_json: bool,
) -> None:
    from peftreg.gguf.model import export_gguf
    from peftreg.merge.inputs import adapter_from_peft_directory

    inputs = [
        adapter_from_peft_directory(path, weight=weights[index] if weights else 1.0)
        for index, path in enumerate(adapters)
    ]
    bar = _Bar() if not quiet and not as_json and sys.stderr.isatty() else None
    try:
        result = export_gguf(
            base_dir,
            inputs,
            output,
            quantization=quantization,
            base_quantization=base_quantization,
            device=device,
            progress=bar,
            replace=force,
        )
    finally:
        if bar is not None:
            bar.close()
    _print_result(
        as_json,
        {
            "output": str(result.output),
            "tensors": result.tensors,
            "bytes": result.bytes_written,
            "merged_modules": result.merged_modules,
            "seconds": round(result.seconds, 3),
            "device": result.device,
            "recipe": result.recipe,
            "tensor_types": result.tensor_types,
        },
        f"merged {len(inputs)} adapter(s), {result.merged_modules} modules, into {result.output}: "
        f"{quantization} GGUF, {result.tensors} tensors, {human_size(result.bytes_written)}, "
        f"{result.seconds:.1f} s on {result.device}",
    )
