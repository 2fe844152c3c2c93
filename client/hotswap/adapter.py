"""`LoadedAdapter`: an adapter read, checked and held on the CPU, ready to stage into a host.

Loading is independent of any host: it reads the config and the tensors
file (the safetensors header is parsed strictly first; nothing is unpickled),
resolves the LoRA-family factors with `client.adapters.factors` (NOLA is
materialized and checked against its recorded digest there), and refuses
non-finite values. What depends on the host (base identity, target modules,
shapes, ranks, virtual tokens) is checked when a host plans the swap.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from client.adapters.factors import FactorError, ModuleFactors, adapter_factors
from client.adapters.nola import NolaDigestMismatch, NolaError
from client.adapters.package import config_blob
from client.adapters.peft_import import (
    NOLA_FILE,
    TENSORS_FILE,
    PeftImportError,
    read_peft_directory,
    read_safetensors_header,
)
from client.adapters.schema import AdapterConfig
from client.hotswap.errors import (
    AdapterDigestMismatch,
    AdapterShapeMismatch,
    NonFiniteAdapter,
    SwapError,
    UnsupportedAdapter,
)
from client.transfer.pull import PullResult

PROMPT_TENSOR = "prompt_embeddings"
LORA_KINDS = ("lora", "dora", "nola")
SERVED_KINDS = (*LORA_KINDS, "prompt_tuning")


@dataclass(frozen=True)
class LoadedAdapter:
    """One adapter on the CPU in fp32: LoRA-family factors per module, or a soft prompt."""

    digest: str  # the artifact's manifest digest; for a local directory, `directory_identity`
    source: str  # where it came from: a reference or a directory
    config: AdapterConfig
    factors: Mapping[str, ModuleFactors] = field(default_factory=dict)
    prompt: torch.Tensor | None = None  # (num_virtual_tokens, dim)

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def nbytes(self) -> int:
        """Bytes of the fp32 tensors held (what the in-memory cache counts)."""
        tensors: list[torch.Tensor] = []
        for item in self.factors.values():
            tensors += [item.a, item.b]
            tensors += [t for t in (item.magnitude, item.bias) if t is not None]
        if self.prompt is not None:
            tensors.append(self.prompt)
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
        return LoadedAdapter(self.digest, self.source, self.config, factors, prompt)


def _finite(tensor: torch.Tensor) -> bool:
    if tensor.dtype in (torch.float32, torch.float64) and tensor.device.type == "cpu":
        return bool(np.isfinite(tensor.numpy()).all())  # much faster than torch's on the CPU
    return bool(torch.isfinite(tensor).all())


def _check_finite(name: str, tensor: torch.Tensor | None) -> None:
    if tensor is not None and not _finite(tensor):
        raise NonFiniteAdapter(f"{name} holds NaN or infinite values; refusing the adapter")


def _factors(
    config: AdapterConfig, tensors: Mapping[str, torch.Tensor]
) -> dict[str, ModuleFactors]:
    try:
        factors = adapter_factors(config, tensors)
    except NolaDigestMismatch as exc:
        raise AdapterDigestMismatch(str(exc)) from None
    except NolaError as exc:
        raise SwapError(f"NOLA adapter: {exc}") from None
    except FactorError as exc:
        raise AdapterShapeMismatch(str(exc)) from None
    for module, item in factors.items():
        for part, tensor in (
            ("lora_A", item.a),
            ("lora_B", item.b),
            ("lora_magnitude_vector", item.magnitude),
            ("lora_B.bias", item.bias),
        ):
            _check_finite(f"{module}.{part}", tensor)
    return factors


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
    _check_finite(PROMPT_TENSOR, prompt)
    return prompt.contiguous()


def adapter_from_tensors(
    config: AdapterConfig, tensors: Mapping[str, torch.Tensor], *, digest: str, source: str
) -> LoadedAdapter:
    """Check and hold an adapter given its config and loaded tensors file."""
    if config.kind not in SERVED_KINDS:
        raise UnsupportedAdapter(
            f"{source}: a {config.kind} adapter cannot be hot-swapped; the host serves "
            f"{', '.join(SERVED_KINDS)}"
        )
    if config.peft_config.get("modules_to_save"):
        raise UnsupportedAdapter(
            f"{source}: modules_to_save ({config.peft_config['modules_to_save']}) replaces "
            "whole modules, which a hot-swap host does not do"
        )
    if config.kind == "prompt_tuning":
        return LoadedAdapter(digest, source, config, prompt=_prompt(config, tensors))
    return LoadedAdapter(digest, source, config, factors=_factors(config, tensors))


def tensors_title(config: AdapterConfig) -> str:
    return NOLA_FILE if config.kind == "nola" else TENSORS_FILE


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A tensors file, its header checked by the strict parser before loading."""
    try:
        read_safetensors_header(path)
    except PeftImportError as exc:
        raise SwapError(str(exc)) from None
    return load_file(str(path), device="cpu")


def adapter_from_pull(result: PullResult, *, source: str | None = None) -> LoadedAdapter:
    """A pulled artifact (its snapshot or output directory and its adapter config)."""
    if result.adapter_config is None:
        raise UnsupportedAdapter(f"{result.reference} is not a typed adapter artifact")
    config = AdapterConfig.model_validate_json(result.adapter_config)
    title = tensors_title(config)
    path = result.path / title
    if not path.is_file():
        raise SwapError(f"{result.reference} has no {title} layer")
    return adapter_from_tensors(
        config,
        read_tensors(path),
        digest=str(result.digest),
        source=source or str(result.reference),
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


def adapter_from_directory(
    path: Path,
    *,
    base_fingerprint: str | None = None,
    base_structure_hash: str | None = None,
) -> LoadedAdapter:
    """A PEFT directory on disk (or a pulled `--format peft` one)."""
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
    tensors = load_file(str(imported.tensors_path), device="cpu")
    return adapter_from_tensors(imported.config, tensors, digest=digest, source=str(path))
