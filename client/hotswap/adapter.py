"""`LoadedAdapter`: an adapter read, checked and held on the CPU, ready to stage into a host.

Loading is independent of any host: it reads the config and the tensors
file (the safetensors header is parsed strictly first; nothing is unpickled;
a pulled layer is hashed against its manifest descriptor), refuses tensors
and PEFT features a host would not serve (`peftreg.hotswap.contents`),
resolves the LoRA-family factors with `peftreg.adapters.factors` (NOLA is
materialized and checked against its recorded digest there), and refuses
non-finite values, recording each tensor's largest magnitude (or, for fp32
factors viewed in one file buffer, the largest of them all, found in one
pass: an upper bound the planner refines before refusing). What depends
on the host (base identity, target modules, shapes, ranks, virtual tokens,
whether the values fit the slots' dtype) is checked when a host plans the swap.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from peftreg.adapters.factors import FactorError, ModuleFactors, adapter_factors
from peftreg.adapters.ia3 import Ia3Scale, ia3_scales
from peftreg.adapters.nola import NolaDigestMismatch, NolaError
from peftreg.adapters.package import config_blob
from peftreg.adapters.peft_import import (
    CONFIG_FILE,
    NOLA_FILE,
    TENSORS_FILE,
    PeftImportError,
    pickle_files,
    read_peft_directory,
    read_safetensors_header,
)
from peftreg.adapters.schema import AdapterConfig
from peftreg.formats.safetensors_header import SafetensorsError
from peftreg.hotswap.contents import (
    PROMPT_KINDS,
    PROMPT_TENSOR,
    TASK_COLS,
    TASK_ROWS,
    check_consumed,
    check_features,
    saved_base_layers,
)
from peftreg.hotswap.errors import (
    AdapterDigestMismatch,
    AdapterShapeMismatch,
    NonFiniteAdapter,
    SwapError,
    UnsupportedAdapter,
)
from peftreg.hotswap.layouts import INSPECTED_KINDS, INSPECTIONS, LAYOUTS, FactorLayout, Inspected
from peftreg.hotswap.tensorfile import (
    HeaderRead,
    PendingRead,
    SpanScan,
    allocate,
    header_reader,
    read_file_once,
    read_prefix,
    tensors_from_buffer,
    tensors_in,
)
from peftreg.transfer.pull import PullResult

LORA_KINDS = ("lora", "dora", "nola")
# Served in both modes by hot-swap's own slots (IA3 merged: by peft's layers).
SERVED_KINDS = (*LORA_KINDS, "ia3", *PROMPT_KINDS)
# Held as factors but merged only: the host refuses them in unmerged mode when it plans.
MERGED_FACTOR_KINDS = ("mora",)


def swap_refusal(kind: str) -> str:
    """Why a host does not serve an adapter of `kind` (in unmerged mode, or in either),
    and what serves it instead."""
    from peftreg.merge.compat import BOTTLENECK_REASON, PEFT_MERGED_KINDS

    if kind == "bottleneck":
        return (
            f"a bottleneck adapter cannot be hot-swapped: {BOTTLENECK_REASON}, and peft has "
            "no such type; AdapterHub's `adapters` library serves it (pull --format adapterhub)"
        )
    if kind == "ia3":
        return (
            "an ia3 adapter with a PEFT feature unmerged hot-swap does not implement cannot "
            "be hot-swapped in unmerged mode; a host attached with mode='merged' serves it "
            "(merged by peft's own layers)"
        )
    if kind in PEFT_MERGED_KINDS or kind in MERGED_FACTOR_KINDS:
        how = "peft's own layers" if kind in PEFT_MERGED_KINDS else "peftreg's MoRA operator"
        return (
            f"a {kind} adapter cannot be hot-swapped in unmerged mode; a host attached "
            f"with mode='merged' serves it (merged by {how})"
        )
    served = f"hot-swap serves {', '.join(SERVED_KINDS)} in both modes"
    return (
        f"a {kind} adapter cannot be hot-swapped in unmerged or merged mode ({served}); "
        "peft's PeftModel serves it"
    )


@dataclass(frozen=True)
class FactorBounds:
    """The largest |value| of one module's factors (0.0 for an absent tensor).

    `exact=False`: upper bounds (the largest |value| of all the adapter's
    factors, found in one pass); a check they fail is made again with each
    tensor's own largest value before anything is refused.
    """

    a: float
    b: float
    bias: float = 0.0
    exact: bool = True


@dataclass(frozen=True)
class LoadedAdapter:
    """One adapter on the CPU in fp32: LoRA-family factors or IA3 vectors per module, or a
    soft prompt (a multitask prompt: one per task)."""

    digest: str  # the artifact's manifest digest; for a local directory, `directory_identity`
    source: str  # where it came from: a reference or a directory
    config: AdapterConfig
    factors: Mapping[str, ModuleFactors] = field(default_factory=dict)
    prompt: torch.Tensor | None = None  # (num_virtual_tokens, dim)
    bounds: Mapping[str, FactorBounds] = field(default_factory=dict)  # per module
    prompt_bound: float = 0.0  # largest |value| of the soft prompt
    base_layers: Mapping[str, torch.Tensor] = field(default_factory=dict)  # see contents.py
    # Another peft type that peft merges: its tensors as saved, merged by peft's own
    # layers in merged mode (`peftreg.merge.peft_modules`).
    peft_tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)
    # IA3, unmerged: each module's vector (views of `peft_tensors`, which merged mode uses).
    ia3: Mapping[str, Ia3Scale] = field(default_factory=dict)
    # Multitask prompt tuning: every task's virtual tokens (tasks, n, dim); a swap picks one.
    task_prompts: torch.Tensor | None = None
    # Where the factors lie in their file, shared by every adapter of that layout (checks
    # that depend on it alone need not run again); None: not read through a known layout.
    layout: FactorLayout | None = field(default=None, compare=False, repr=False)

    @property
    def tasks(self) -> int:
        """How many tasks a multitask prompt serves (0: not one)."""
        return 0 if self.task_prompts is None else int(self.task_prompts.shape[0])

    @property
    def kind(self) -> str:
        return self.config.kind

    @cached_property
    def nbytes(self) -> int:
        """Bytes of the tensors held (what the in-memory cache counts)."""
        if self.layout is not None and self._factors_only:
            return self.layout.nbytes  # the same for every adapter of the layout
        tensors: list[torch.Tensor] = []
        for item in self.factors.values():
            tensors += [item.a, item.b]
            tensors += [t for t in (item.magnitude, item.bias) if t is not None]
        if self.prompt is not None:
            tensors.append(self.prompt)
        if self.task_prompts is not None:
            tensors.append(self.task_prompts)
        tensors += list(self.base_layers.values())
        tensors += list(self.peft_tensors.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def _factors_only(self) -> bool:
        return (
            self.prompt is None
            and self.task_prompts is None
            and not self.base_layers
            and not self.peft_tensors
        )

    def pin_memory(self) -> LoadedAdapter:
        """A copy whose tensors are in page-locked memory (fast, asynchronous GPU copies)."""
        factors = {
            name: replace(
                f,
                a=f.a.pin_memory(),
                b=f.b.pin_memory(),
                magnitude=None if f.magnitude is None else f.magnitude.pin_memory(),
                bias=None if f.bias is None else f.bias.pin_memory(),
            )
            for name, f in self.factors.items()
        }
        prompt = None if self.prompt is None else self.prompt.pin_memory()
        return LoadedAdapter(
            self.digest,
            self.source,
            self.config,
            factors,
            prompt,
            self.bounds,
            self.prompt_bound,
            self.base_layers,
            peft_tensors=self.peft_tensors,
            ia3={
                name: Ia3Scale(item.module, item.vector.pin_memory(), item.feedforward)
                for name, item in self.ia3.items()
            },
            task_prompts=None if self.task_prompts is None else self.task_prompts.pin_memory(),
        )


def largest(tensor: torch.Tensor | None) -> float:
    """max |value| (0.0 for None or an empty tensor); NaN when any value is NaN."""
    if tensor is None or tensor.numel() == 0:
        return 0.0
    if tensor.dtype in (torch.float32, torch.float64) and tensor.device.type == "cpu":
        # numpy's max and min (no |x| temporary) are much faster than torch's on the CPU;
        # np.maximum keeps a NaN from either
        values = tensor.detach().numpy()
        return float(np.maximum(values.max(), -values.min()))
    return float(tensor.detach().abs().max())


def _bounded(name: str, tensor: torch.Tensor | None) -> float:
    value = largest(tensor)
    if not math.isfinite(value):
        raise NonFiniteAdapter(f"{name} holds NaN or infinite values; refusing the adapter")
    return value


def _shared_bound(factors: Iterable[ModuleFactors]) -> float | None:
    """The largest |value| of every factor tensor at once, when they are all fp32 views of
    one CPU buffer (a file read whole): one vectorised pass over the span they lie in.

    None when they are not, or when the span holds a value that is not finite
    (which may belong to no factor: the tensors are then checked one by one,
    naming the one at fault).
    """
    tensors = [
        tensor
        for item in factors
        for tensor in (item.a, item.b, item.magnitude, item.bias)
        if tensor is not None
    ]
    if not tensors:
        return None
    storage = tensors[0].untyped_storage()
    address = storage.data_ptr()
    begin, end = storage.nbytes(), 0
    for tensor in tensors:
        if (
            tensor.dtype != torch.float32
            or tensor.device.type != "cpu"
            or not tensor.is_contiguous()
            or tensor.untyped_storage().data_ptr() != address
        ):
            return None
        start = int(tensor.storage_offset()) * 4  # bytes; a multiple of 4 from `begin` too
        begin, end = min(begin, start), max(end, start + tensor.numel() * 4)
    if begin >= end:
        return None
    span = torch.empty(0, dtype=torch.float32).set_(
        storage, begin // 4, ((end - begin) // 4,), (1,)
    )
    value = largest(span)
    return value if math.isfinite(value) else None


def _shared_bounds(factors: Mapping[str, ModuleFactors], shared: float) -> dict[str, FactorBounds]:
    """Every module bounded by one bound of all the factors (upper bounds; two immutable
    objects shared by the modules, with a bias and without)."""
    plain = FactorBounds(shared, shared, 0.0, exact=False)
    biased = FactorBounds(shared, shared, shared, exact=False)
    return {module: plain if item.bias is None else biased for module, item in factors.items()}


def _factors(
    config: AdapterConfig, tensors: Mapping[str, torch.Tensor]
) -> tuple[dict[str, ModuleFactors], dict[str, FactorBounds]]:
    try:
        factors = adapter_factors(config, tensors)
    except NolaDigestMismatch as exc:
        raise AdapterDigestMismatch(str(exc)) from None
    except NolaError as exc:
        raise SwapError(f"NOLA adapter: {exc}") from None
    except FactorError as exc:
        raise AdapterShapeMismatch(str(exc)) from None
    shared = _shared_bound(factors.values())
    if shared is not None:  # every value finite: one pass over them all
        return factors, _shared_bounds(factors, shared)
    bounds = {}
    for module, item in factors.items():
        _bounded(f"{module}.lora_magnitude_vector", item.magnitude)
        bounds[module] = FactorBounds(
            a=_bounded(f"{module}.lora_A", item.a),
            b=_bounded(f"{module}.lora_B", item.b),
            bias=_bounded(f"{module}.lora_B.bias", item.bias),
        )
    return factors, bounds


def _prompt(config: AdapterConfig, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The virtual tokens (n, dim): p-tuning's are its prompt encoder's output, computed
    by peft when it saved the adapter (`get_prompt_embedding_to_save`), which is what
    peft's own forward uses once the adapter is loaded for inference."""
    if PROMPT_TENSOR not in tensors:
        raise AdapterShapeMismatch(f"a {config.kind} adapter needs the tensor {PROMPT_TENSOR}")
    prompt = tensors[PROMPT_TENSOR].detach().to("cpu", torch.float32)
    submodules = int(config.peft_config.get("num_transformer_submodules") or 1)
    if submodules != 1:
        raise UnsupportedAdapter(
            f"the soft prompt is for {submodules} transformer submodules (encoder-decoder); "
            "the host serves decoder-only models"
        )
    tokens = config.num_virtual_tokens
    if prompt.ndim != 2 or tokens is None or prompt.shape[0] != tokens:
        raise AdapterShapeMismatch(
            f"{PROMPT_TENSOR} has shape {list(prompt.shape)}, not ({tokens}, token_dim)"
        )
    return prompt.contiguous()


def _task_prompts(config: AdapterConfig, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Every task's virtual tokens (tasks, n, dim), as peft's `MultitaskPromptEmbedding`
    makes them: the shared prompt times (prefix_task_cols[t] @ prefix_task_rows[t])."""
    shared = _prompt(config, tensors)
    for name in (TASK_COLS, TASK_ROWS):
        if name not in tensors:
            raise AdapterShapeMismatch(f"a {config.kind} adapter needs the tensor {name}")
    cols = tensors[TASK_COLS].detach().to("cpu", torch.float32)
    rows = tensors[TASK_ROWS].detach().to("cpu", torch.float32)
    tokens, dim = shared.shape
    if (
        cols.ndim != 3
        or rows.ndim != 3
        or cols.shape[0] != rows.shape[0]
        or cols.shape[1] != tokens
        or cols.shape[2] != rows.shape[1]
        or rows.shape[2] != dim
    ):
        raise AdapterShapeMismatch(
            f"{TASK_COLS} {list(cols.shape)} and {TASK_ROWS} {list(rows.shape)} do not make "
            f"(tasks, {tokens}, {dim}) task prompts"
        )
    _bounded(TASK_COLS, cols)
    _bounded(TASK_ROWS, rows)
    return (shared.unsqueeze(0) * torch.matmul(cols, rows)).contiguous()


def _ia3(
    config: AdapterConfig, tensors: Mapping[str, torch.Tensor], source: str
) -> dict[str, Ia3Scale]:
    """IA3's vectors for unmerged mode; a PEFT config feature unmerged mode does not
    implement leaves them empty (the planner then refuses unmerged mode, naming merged mode,
    where peft's own layers serve it)."""
    try:
        check_features(config, source)
    except UnsupportedAdapter:
        return {}
    try:
        return ia3_scales(config.peft_config, tensors)
    except FactorError as exc:
        raise AdapterShapeMismatch(f"{source}: {exc}") from None


def adapter_from_tensors(
    config: AdapterConfig, tensors: Mapping[str, torch.Tensor], *, digest: str, source: str
) -> LoadedAdapter:
    """Check and hold an adapter given its config and loaded tensors file."""
    from peftreg.merge.compat import PEFT_MERGED_KINDS

    if config.kind in PEFT_MERGED_KINDS:
        for name, value in tensors.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise NonFiniteAdapter(f"{source}: tensor {name} holds NaN or Inf values")
        held = {name: value.detach().to("cpu").contiguous() for name, value in tensors.items()}
        scales = _ia3(config, held, source) if config.kind == "ia3" else {}
        return LoadedAdapter(digest, source, config, peft_tensors=held, ia3=scales)
    if config.kind not in SERVED_KINDS and config.kind not in MERGED_FACTOR_KINDS:
        raise UnsupportedAdapter(f"{source}: {swap_refusal(config.kind)}")
    check_features(config, source)
    check_consumed(config, tensors, source)
    if config.kind == "multitask_prompt_tuning":
        prompts = _task_prompts(config, tensors)
        bound = _bounded("the task prompts", prompts)
        return LoadedAdapter(digest, source, config, task_prompts=prompts, prompt_bound=bound)
    if config.kind in PROMPT_KINDS:
        prompt = _prompt(config, tensors)
        bound = _bounded(PROMPT_TENSOR, prompt)
        return LoadedAdapter(digest, source, config, prompt=prompt, prompt_bound=bound)
    factors, bounds = _factors(config, tensors)
    base_layers = {
        module: weight.detach().to("cpu").contiguous()
        for module, weight in saved_base_layers(config, tensors).items()
    }
    return LoadedAdapter(
        digest, source, config, factors=factors, bounds=bounds, base_layers=base_layers
    )


def tensors_title(config: AdapterConfig) -> str:
    return NOLA_FILE if config.kind == "nola" else TENSORS_FILE


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A tensors file, its header checked by the strict parser before loading (one parse,
    one read; `peftreg.hotswap.tensorfile`)."""
    reads: list[HeaderRead] = []
    try:
        read_safetensors_header(path, header_reader(reads))
    except PeftImportError as exc:
        raise SwapError(str(exc)) from None
    return read_file_once(reads[0])


def verified_layer(result: PullResult, title: str) -> torch.Tensor:
    """The bytes of a pulled layer (uint8, read once), checked against its manifest
    descriptor (size, digest)."""
    entry = next((item for item in result.files if str(item[0]) == title), None)
    if entry is None:
        raise SwapError(f"{result.reference} has no {title} layer")
    _title, digest, size = entry
    path = result.path / title
    try:
        with path.open("rb") as stream:
            data = allocate(os.fstat(stream.fileno()).st_size)
            read = stream.readinto(data.numpy().data)
    except FileNotFoundError:
        raise SwapError(f"{result.reference}: {title} is missing from {result.path}") from None
    actual = hashlib.new(digest.algorithm, data.numpy().data[:read]).hexdigest()
    if read != size or actual != digest.hex:
        raise AdapterDigestMismatch(
            f"{result.reference}: the pulled {title} ({read} bytes, "
            f"{digest.algorithm}:{actual}) does not match its manifest descriptor ({size} bytes, "
            f"{digest}); the local copy was altered"
        )
    return data


def tensors_from_bytes(data: bytes | torch.Tensor, title: str) -> dict[str, torch.Tensor]:
    """A safetensors file held in memory, its header checked by the strict parser first;
    the tensors are views of one buffer (`data` itself when it is a uint8 tensor)."""
    if not isinstance(data, torch.Tensor):
        data = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return tensors_from_buffer(data, title)


def adapter_from_pull(result: PullResult, *, source: str | None = None) -> LoadedAdapter:
    """A pulled artifact (its snapshot or output directory and its adapter config)."""
    if result.adapter_config is None:
        raise UnsupportedAdapter(f"{result.reference} is not a typed adapter artifact")
    config = AdapterConfig.model_validate_json(result.adapter_config)
    if config.kind == "bottleneck":  # its tensors file is AdapterHub's, not PEFT's
        raise UnsupportedAdapter(f"{source or result.reference}: {swap_refusal(config.kind)}")
    title = tensors_title(config)
    tensors = tensors_from_bytes(verified_layer(result, title), title)
    return adapter_from_tensors(
        config, tensors, digest=str(result.digest), source=source or str(result.reference)
    )


def directory_identity(
    config: AdapterConfig,
    tensors_path: Path,
    header_bytes: bytes | None = None,
    blob: bytes | None = None,
) -> str:
    """A digest naming a local PEFT directory's adapter: its config, the tensors file's
    header, and the file's size, modification time, inode and path.

    An identity for the cache and for events, cheap to compute; not a content
    digest (a local directory has no recorded digest to verify against).
    `header_bytes`: the file's header as already read (else it is read here);
    `blob`: `config_blob(config)` as already made.
    """
    stat = tensors_path.stat()
    header = header_bytes
    if header is None:
        with tensors_path.open("rb") as stream:
            header = stream.read(8)
            header += stream.read(int.from_bytes(header, "little")) if len(header) == 8 else b""
    hasher = hashlib.sha256(config_blob(config) if blob is None else blob)
    hasher.update(header)
    hasher.update(
        f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}:{tensors_path.resolve()}".encode()
    )
    return f"sha256:{hasher.hexdigest()}"


@dataclass(frozen=True)
class LocalAdapter:
    """A PEFT directory's config and identity, read without loading its tensors."""

    path: Path
    config: AdapterConfig
    tensors_path: Path
    digest: str  # `directory_identity`
    header: HeaderRead | None = None  # the tensors file's header as read and parsed
    blob: bytes | None = None  # `config_blob(config)`


def inspect_directory(
    path: Path,
    *,
    base_fingerprint: str | None = None,
    base_structure_hash: str | None = None,
) -> LocalAdapter:
    """Read a PEFT directory's config and tensor header (cheap: what a cache lookup needs).

    A LoRA or DoRA directory whose config and header bytes were resolved before
    (`peftreg.hotswap.layouts.INSPECTIONS`) is not resolved again.
    """
    path = Path(path)
    config_bytes = _config_bytes(path)
    known = _inspected(path, config_bytes, base_fingerprint, base_structure_hash)
    if known is not None:
        return known
    reads: list[HeaderRead] = []
    try:
        imported = read_peft_directory(
            Path(path),
            base_fingerprint=base_fingerprint,
            base_structure_hash=base_structure_hash,
            read_header=header_reader(reads),
        )
    except NolaDigestMismatch as exc:
        raise AdapterDigestMismatch(str(exc)) from None
    except PeftImportError as exc:
        raise SwapError(str(exc)) from None
    except NolaError as exc:
        raise SwapError(f"NOLA adapter: {exc}") from None
    read = next((item for item in reads if item.path == imported.tensors_path), None)
    raw = None if read is None else read.raw
    blob = config_blob(imported.document)
    digest = directory_identity(imported.config, imported.tensors_path, raw, blob)
    if (
        read is not None
        and config_bytes is not None
        and imported.config.kind in INSPECTED_KINDS
        and _config_bytes(path) == config_bytes  # what was resolved is what was keyed
    ):
        key = (config_bytes, read.raw, read.stat[0], base_fingerprint, base_structure_hash)
        INSPECTIONS.put(key, Inspected(imported.config, blob))
    return LocalAdapter(path, imported.config, imported.tensors_path, digest, read, blob)


def _config_bytes(path: Path) -> bytes | None:
    try:
        return (path / CONFIG_FILE).read_bytes()
    except OSError:
        return None  # (read_peft_directory says what is wrong)


def _inspected(
    path: Path,
    config_bytes: bytes | None,
    base_fingerprint: str | None,
    base_structure_hash: str | None,
) -> LocalAdapter | None:
    """The directory as inspected before, when its config and header bytes are known."""
    tensors_path = path / TENSORS_FILE
    if config_bytes is None or pickle_files(path):
        return None  # (the full inspection refuses pickles)
    try:
        read = read_prefix(tensors_path)
    except (OSError, SafetensorsError):
        return None
    key = (config_bytes, read.raw, read.stat[0], base_fingerprint, base_structure_hash)
    known = INSPECTIONS.get(key)
    if known is None:
        return None
    digest = directory_identity(known.config, tensors_path, read.raw, known.blob)
    return LocalAdapter(path, known.config, tensors_path, digest, read, known.blob)


def adapter_from_local(local: LocalAdapter) -> LoadedAdapter:
    """Load the tensors of an inspected directory (its header is not parsed again; a layout
    seen before is not worked out again, `peftreg.hotswap.layouts.LAYOUTS`)."""
    if local.header is None:
        tensors = read_tensors(local.tensors_path)
        return adapter_from_tensors(
            local.config, tensors, digest=local.digest, source=str(local.path)
        )
    key = None if local.blob is None else (local.blob, local.header.raw)
    layout = None if key is None else LAYOUTS.get(key)
    scan = None if layout is None else SpanScan(4 * layout.begin, 4 * layout.end)
    pending = PendingRead(local.header, scan)
    try:  # the views are made while the helper thread reads; valid once the read is done
        factors = None if layout is None else layout.factors(pending.buffer)
    finally:
        buffer = pending.wait()
    if layout is not None and scan is not None and factors is not None:
        value = scan.bound  # above every factor's |values|, scanned as they were read
        if math.isfinite(value):
            bounds = _shared_bounds(factors, value)
            return LoadedAdapter(
                local.digest,
                str(local.path),
                local.config,
                factors=factors,
                bounds=bounds,
                layout=layout,
            )
        # a value not finite: the full path names the tensor
    tensors = tensors_in(buffer, local.header.header)
    adapter = adapter_from_tensors(
        local.config, tensors, digest=local.digest, source=str(local.path)
    )
    learn = key is not None and layout is None and local.config.kind in INSPECTED_KINDS
    if learn and not adapter.base_layers and not adapter.peft_tensors:
        found = FactorLayout.of(buffer, adapter.factors)
        if found is not None:
            assert key is not None
            LAYOUTS.put(key, found)
    return adapter


def adapter_from_directory(
    path: Path,
    *,
    base_fingerprint: str | None = None,
    base_structure_hash: str | None = None,
) -> LoadedAdapter:
    """A PEFT directory on disk (or a pulled `--format peft` one)."""
    local = inspect_directory(
        path, base_fingerprint=base_fingerprint, base_structure_hash=base_structure_hash
    )
    return adapter_from_local(local)
