"""`LoadedAdapter`: an adapter read, checked and held on the CPU, ready to stage into a host.

Loading is independent of any host: it reads the config and the tensors
file (the safetensors header is parsed strictly first; nothing is unpickled;
a pulled layer is hashed against its manifest descriptor), refuses tensors
and PEFT features a host would not serve (`peftreg.hotswap.contents`),
resolves the LoRA-family factors with `peftreg.adapters.factors` (NOLA is
materialized and checked against its recorded digest there), and refuses
non-finite values, recording each tensor's largest magnitude. What depends
on the host (base identity, target modules, shapes, ranks, virtual tokens,
whether the values fit the slots' dtype) is checked when a host plans the swap.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file

from peftreg.adapters.factors import FactorError, ModuleFactors, adapter_factors
from peftreg.adapters.nola import NolaDigestMismatch, NolaError
from peftreg.adapters.package import config_blob
from peftreg.adapters.peft_import import (
    NOLA_FILE,
    TENSORS_FILE,
    PeftImportError,
    read_peft_directory,
    read_safetensors_header,
)
from peftreg.adapters.schema import AdapterConfig
from peftreg.formats.safetensors_header import SafetensorsError, read_header
from peftreg.hotswap.contents import (
    PROMPT_TENSOR,
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
from peftreg.transfer.pull import PullResult

LORA_KINDS = ("lora", "dora", "nola")
SERVED_KINDS = (*LORA_KINDS, "prompt_tuning")


def swap_refusal(kind: str) -> str:
    """Why a host does not serve an adapter of `kind` (in unmerged mode, or in either),
    and what serves it instead."""
    from peftreg.merge.compat import BOTTLENECK_REASON, PEFT_MERGED_KINDS

    if kind == "bottleneck":
        return (
            f"a bottleneck adapter cannot be hot-swapped: {BOTTLENECK_REASON}, and peft has "
            "no such type; AdapterHub's `adapters` library serves it (pull --format adapterhub)"
        )
    if kind in PEFT_MERGED_KINDS:
        return (
            f"a {kind} adapter cannot be hot-swapped in unmerged mode; a host attached "
            "with mode='merged' serves it (merged by peft's own layers)"
        )
    served = f"hot-swap serves {', '.join(SERVED_KINDS)} in both modes"
    return (
        f"a {kind} adapter cannot be hot-swapped in unmerged or merged mode ({served}); "
        "peft's PeftModel serves it"
    )


@dataclass(frozen=True)
class FactorBounds:
    """The largest |value| of one module's factors (0.0 for an absent tensor)."""

    a: float
    b: float
    bias: float = 0.0


@dataclass(frozen=True)
class LoadedAdapter:
    """One adapter on the CPU in fp32: LoRA-family factors per module, or a soft prompt."""

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

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors held (what the in-memory cache counts)."""
        tensors: list[torch.Tensor] = []
        for item in self.factors.values():
            tensors += [item.a, item.b]
            tensors += [t for t in (item.magnitude, item.bias) if t is not None]
        if self.prompt is not None:
            tensors.append(self.prompt)
        tensors += list(self.base_layers.values())
        tensors += list(self.peft_tensors.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    def pin_memory(self) -> LoadedAdapter:
        """A copy whose tensors are in page-locked memory (fast, asynchronous GPU copies)."""
        factors = {
            name: ModuleFactors(
                f.module,
                f.layer,
                f.a.pin_memory(),
                f.b.pin_memory(),
                f.scaling,
                None if f.magnitude is None else f.magnitude.pin_memory(),
                None if f.bias is None else f.bias.pin_memory(),
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
        )


def largest(tensor: torch.Tensor | None) -> float:
    """max |value| (0.0 for None or an empty tensor); NaN when any value is NaN."""
    if tensor is None or tensor.numel() == 0:
        return 0.0
    if tensor.dtype in (torch.float32, torch.float64) and tensor.device.type == "cpu":
        return float(np.max(np.abs(tensor.numpy())))  # much faster than torch's on the CPU
    return float(tensor.detach().abs().max())


def _bounded(name: str, tensor: torch.Tensor | None) -> float:
    value = largest(tensor)
    if not math.isfinite(value):
        raise NonFiniteAdapter(f"{name} holds NaN or infinite values; refusing the adapter")
    return value


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
    if PROMPT_TENSOR not in tensors:
        raise AdapterShapeMismatch(f"a prompt_tuning adapter needs the tensor {PROMPT_TENSOR}")
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
        return LoadedAdapter(digest, source, config, peft_tensors=held)
    if config.kind not in SERVED_KINDS:
        raise UnsupportedAdapter(f"{source}: {swap_refusal(config.kind)}")
    check_features(config, source)
    check_consumed(config, tensors, source)
    if config.kind == "prompt_tuning":
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
    """A tensors file, its header checked by the strict parser before loading."""
    try:
        read_safetensors_header(path)
    except PeftImportError as exc:
        raise SwapError(str(exc)) from None
    return load_file(str(path), device="cpu")


def verified_layer(result: PullResult, title: str) -> bytes:
    """The bytes of a pulled layer, checked against its manifest descriptor (size, digest)."""
    entry = next((item for item in result.files if str(item[0]) == title), None)
    if entry is None:
        raise SwapError(f"{result.reference} has no {title} layer")
    _title, digest, size = entry
    path = result.path / title
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SwapError(f"{result.reference}: {title} is missing from {result.path}") from None
    actual = hashlib.new(digest.algorithm, data).hexdigest()
    if len(data) != size or actual != digest.hex:
        raise AdapterDigestMismatch(
            f"{result.reference}: the pulled {title} ({len(data)} bytes, "
            f"{digest.algorithm}:{actual}) does not match its manifest descriptor ({size} bytes, "
            f"{digest}); the local copy was altered"
        )
    return data


def tensors_from_bytes(data: bytes, title: str) -> dict[str, torch.Tensor]:
    """A safetensors file held in memory, its header checked by the strict parser first."""
    try:
        read_header(io.BytesIO(data), len(data))
    except SafetensorsError as exc:
        raise SwapError(f"{title}: {exc}") from None
    return load_bytes(data)


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


def directory_identity(config: AdapterConfig, tensors_path: Path) -> str:
    """A digest naming a local PEFT directory's adapter: its config, the tensors file's
    header, and the file's size, modification time, inode and path.

    An identity for the cache and for events, cheap to compute; not a content
    digest (a local directory has no recorded digest to verify against).
    """
    stat = tensors_path.stat()
    with tensors_path.open("rb") as stream:
        header = stream.read(8)
        header += stream.read(int.from_bytes(header, "little")) if len(header) == 8 else b""
    hasher = hashlib.sha256(config_blob(config))
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


def inspect_directory(
    path: Path,
    *,
    base_fingerprint: str | None = None,
    base_structure_hash: str | None = None,
) -> LocalAdapter:
    """Read a PEFT directory's config and tensor header (cheap: what a cache lookup needs)."""
    try:
        imported = read_peft_directory(
            Path(path), base_fingerprint=base_fingerprint, base_structure_hash=base_structure_hash
        )
    except NolaDigestMismatch as exc:
        raise AdapterDigestMismatch(str(exc)) from None
    except PeftImportError as exc:
        raise SwapError(str(exc)) from None
    except NolaError as exc:
        raise SwapError(f"NOLA adapter: {exc}") from None
    digest = directory_identity(imported.config, imported.tensors_path)
    return LocalAdapter(Path(path), imported.config, imported.tensors_path, digest)


def adapter_from_local(local: LocalAdapter) -> LoadedAdapter:
    """Load the tensors of an inspected directory."""
    tensors = read_tensors(local.tensors_path)
    return adapter_from_tensors(local.config, tensors, digest=local.digest, source=str(local.path))


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
