"""Calibrated INT4 (GPTQ, AWQ) of a model directory through llm-compressor.

`quantize_calibrated` takes a dense Hugging Face model directory (the merge's
output: config.json, safetensors, tokenizer) and calibration documents
(`peftreg.formats.calibration`), and writes a compressed-tensors W4A16
`pack-quantized` directory, the same scheme `Int4Encoder` writes for `rtn`
and `mse`: symmetric int4 in groups of `group_size` input columns, every
Linear but `lm_head` (and any Linear whose input dimension the group size
does not divide, listed in `ignore` as `Int4Encoder` lists it).

- gptq: llm-compressor's `GPTQModifier` (static activation ordering, its
  default; groups stay contiguous, so no `g_idx` is written);
- awq: its `AWQModifier` (activation-aware channel scaling, mappings inferred
  from the architecture) followed by its `QuantizationModifier`.

Calibration: each document is tokenized by the model's own tokenizer and cut
into windows of `max_sequence_length` tokens (a last partial window is kept
when it holds at least half of one, or is a document's only one); when there
are more windows than `samples`, evenly spaced ones are taken, so the choice
is deterministic and spans the whole text. torch is seeded with `seed`.

Memory: llm-compressor's sequential pipeline runs one decoder layer at a time
(on the accelerator when there is one); the whole model stays in host memory,
loaded in fp32 on a CPU-only machine (CPU half-precision kernels are slow and
GPTQ accumulates in fp32) and in the checkpoint's dtype otherwise, then cast
back to the checkpoint's dtype before it is compressed. `make bench-quant`
measures the peak (README).

The output directory appears whole or not at all (built beside it, files
fsynced, renamed into place). llm-compressor keeps one global session, so
calls are serialized within a process; its loguru console output is sent to
`logging` (logger `peftreg.quantize.calibrated`), not stdout. llm-compressor 0.14's AWQ pins cached
activations in page-locked memory, which fails on a machine without an
accelerator; pinning only speeds host-to-device copies, so it is skipped
there for the duration of the call.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from peftreg.adapters.base_package import BASE_FILES
from peftreg.checkpoint.writer import StagedDirectory, copy_durably
from peftreg.quantize.errors import QuantizationError
from peftreg.quantize.int4 import validate_group_size
from peftreg.quantize.quantization_config import PACK_QUANTIZED

CalibratedAlgorithm = Literal["gptq", "awq"]
CALIBRATED_ALGORITHMS: tuple[str, ...] = get_args(CalibratedAlgorithm)
DEFAULT_SAMPLES = 128
DEFAULT_MAX_SEQUENCE_LENGTH = 512
DEFAULT_SEED = 0
MIN_SEQUENCE_LENGTH = 16
COPIED_FILES = tuple(
    name for name in BASE_FILES if name not in ("config.json", "model.safetensors.index.json")
)

_ONESHOT = threading.Lock()  # llm-compressor's session is process-global
LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationSettings:
    samples: int = DEFAULT_SAMPLES
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise QuantizationError(f"calibration samples must be at least 1, not {self.samples}")
        if self.max_sequence_length < MIN_SEQUENCE_LENGTH:
            raise QuantizationError(
                f"the calibration sequence length must be at least {MIN_SEQUENCE_LENGTH} tokens, "
                f"not {self.max_sequence_length}"
            )


@dataclass(frozen=True)
class CalibratedResult:
    output: Path
    recipe: dict[str, Any]  # what the checkpoint's quantization is, for provenance
    samples: int  # calibration windows used
    tokens: int  # tokens in them
    seconds: float


def validate_calibrated_algorithm(algorithm: str) -> CalibratedAlgorithm:
    if algorithm not in CALIBRATED_ALGORITHMS:
        raise QuantizationError(
            f"calibrated INT4 algorithm must be one of {', '.join(CALIBRATED_ALGORITHMS)}, "
            f"not {algorithm!r}"
        )
    return algorithm  # type: ignore[return-value]


def calibration_windows(
    documents: Sequence[Sequence[int]], samples: int, length: int
) -> list[list[int]]:
    """Token windows of at most `length` from each document; `samples` evenly spaced ones
    when there are more (see the module doc)."""
    windows: list[list[int]] = []
    for ids in documents:
        cut = [list(ids[start : start + length]) for start in range(0, len(ids), length)]
        if len(cut) > 1 and len(cut[-1]) * 2 < length:
            cut.pop()
        windows.extend(window for window in cut if len(window) >= 2)
    if len(windows) > samples:
        windows = [windows[index * len(windows) // samples] for index in range(samples)]
    return windows


def quantize_calibrated(
    model_dir: Path,
    output: Path,
    documents: Sequence[str],
    *,
    algorithm: str,
    group_size: int = 128,
    settings: CalibrationSettings | None = None,
    calibration: dict[str, Any] | None = None,
    replace: bool = False,
) -> CalibratedResult:
    """Quantize the dense model in `model_dir` with GPTQ or AWQ into `output`.

    `calibration` describes where `documents` came from (file name, digest,
    registry reference); it is recorded in the recipe as it is given.
    """
    started = time.perf_counter()
    chosen = validate_calibrated_algorithm(algorithm)
    group_size = validate_group_size(group_size)
    settings = settings or CalibrationSettings()
    modules = load_llmcompressor()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    storage_dtype = _storage_dtype(model_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as error:
        raise QuantizationError(
            f"calibration needs the model's tokenizer, which {model_dir} lacks: {error}"
        ) from None
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in documents]
    windows = calibration_windows(encoded, settings.samples, settings.max_sequence_length)
    if not windows:
        raise QuantizationError("the calibration text holds fewer than 2 tokens")
    load_dtype = storage_dtype if torch.accelerator.is_available() else torch.float32
    with _ONESHOT, _pinning_only_with_accelerator():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=load_dtype)
        model.eval()  # type: ignore[no-untyped-call]
        ignore = _ignored_linears(model, group_size)
        torch.manual_seed(settings.seed)
        try:
            modules.oneshot(
                model=model,
                tokenizer=tokenizer,
                dataset=modules.dataset(windows),
                recipe=modules.recipe(chosen, group_size, ignore),
                pipeline="sequential",
                num_calibration_samples=len(windows),
                shuffle_calibration_samples=False,
                max_seq_length=settings.max_sequence_length,
            )
        except QuantizationError:
            raise
        except Exception as error:  # a library failure, named in one line
            raise QuantizationError(f"{chosen} calibration failed: {error}") from error
        if model.dtype != storage_dtype:
            torch.nn.Module.to(model, storage_dtype)
        with StagedDirectory(Path(output), replace=replace) as staging:
            model.save_pretrained(str(staging.path), save_compressed=True)
            for name in COPIED_FILES:
                if (model_dir / name).is_file() and not (staging.path / name).exists():
                    copy_durably(model_dir / name, staging.path / name)
            _fsync_files(staging.path)
            written = staging.commit()
    recipe = {
        "quantization": "int4",
        "format": PACK_QUANTIZED,
        "group_size": group_size,
        "algorithm": chosen,
        "symmetric": True,
        "ignore": ignore,
        "calibration": {
            **(calibration or {}),
            "samples": len(windows),
            "tokens": sum(len(window) for window in windows),
            "max_sequence_length": settings.max_sequence_length,
            "seed": settings.seed,
        },
        "library": f"llmcompressor {importlib.metadata.version('llmcompressor')}",
    }
    return CalibratedResult(
        output=written,
        recipe=recipe,
        samples=len(windows),
        tokens=sum(len(window) for window in windows),
        seconds=time.perf_counter() - started,
    )


@dataclass(frozen=True)
class _LlmCompressor:
    """The llm-compressor entry points, imported when a calibrated export runs."""

    oneshot: Any
    gptq: Any
    awq: Any
    quantization: Any
    scheme: Any
    args: Any
    dataset_type: Any

    def dataset(self, windows: list[list[int]]) -> Any:
        return self.dataset_type.from_dict(
            {"input_ids": windows, "attention_mask": [[1] * len(window) for window in windows]}
        )

    def recipe(self, algorithm: CalibratedAlgorithm, group_size: int, ignore: list[str]) -> Any:
        weights = self.args(
            num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size
        )
        groups = {"group_0": self.scheme(targets=["Linear"], weights=weights)}
        if algorithm == "gptq":
            return [self.gptq(config_groups=groups, ignore=ignore)]
        return [self.awq(), self.quantization(config_groups=groups, ignore=ignore)]


def load_llmcompressor() -> _LlmCompressor:
    """Import llm-compressor (QuantizationError naming the extra when it is missing)."""
    try:  # its import logs to stdout before `_route_library_logs` can route it
        with contextlib.redirect_stdout(sys.stderr):
            from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
            from datasets import Dataset
            from llmcompressor.entrypoints.oneshot import oneshot
            from llmcompressor.modifiers.gptq import GPTQModifier
            from llmcompressor.modifiers.quantization import QuantizationModifier
            from llmcompressor.modifiers.transform import AWQModifier
    except ImportError as error:
        raise QuantizationError(
            f"GPTQ and AWQ need llm-compressor (pip install 'peftreg[worker]'): {error}"
        ) from None
    _route_library_logs()
    return _LlmCompressor(
        oneshot=oneshot,
        gptq=GPTQModifier,
        awq=AWQModifier,
        quantization=QuantizationModifier,
        scheme=QuantizationScheme,
        args=QuantizationArgs,
        dataset_type=Dataset,
    )


@functools.cache
def _route_library_logs() -> None:
    """llm-compressor logs through loguru to stdout, which would mix its lines into a
    command's `--json` output; its records go to this module's `logging` logger instead."""
    from loguru import logger as loguru_logger

    def forward(message: Any) -> None:
        record = message.record
        LOG.log(int(record["level"].no), "%s", record["message"])

    loguru_logger.remove()
    loguru_logger.add(forward, level="INFO", format="{message}")


@contextlib.contextmanager
def _pinning_only_with_accelerator() -> Iterator[None]:
    """Without an accelerator, make llm-compressor's `IntermediatesCache.pin_memory` a no-op
    for the block (see the module doc); restored afterwards."""
    if torch.accelerator.is_available():
        yield
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    original = IntermediatesCache.pin_memory

    def unpinned(self: Any, batch_index: int, input_names: list[str] | None = None) -> None:
        del self, batch_index, input_names

    IntermediatesCache.pin_memory = unpinned  # type: ignore[method-assign]
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original  # type: ignore[method-assign]


def _storage_dtype(model_dir: Path) -> torch.dtype:
    """The checkpoint's float dtype from config.json (fp32 when it names none)."""
    path = model_dir / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise QuantizationError(f"{path} cannot be read as a model config: {error}") from None
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise QuantizationError(f"{path}: dtype {name!r} is not a float dtype")
    return dtype


def _ignored_linears(model: torch.nn.Module, group_size: int) -> list[str]:
    """`lm_head`, then every Linear whose input dimension `group_size` does not divide."""
    ignore = ["lm_head"]
    quantized = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name in ignore:
            continue
        if module.in_features % group_size:
            ignore.append(name)
        else:
            quantized += 1
    if not quantized:
        raise QuantizationError(
            f"INT4 quantized no tensor: no Linear layer's input dimension is divisible by the "
            f"group size {group_size}"
        )
    return ignore


def _fsync_files(directory: Path) -> None:
    for item in directory.iterdir():
        if item.is_file():
            descriptor = os.open(item, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
