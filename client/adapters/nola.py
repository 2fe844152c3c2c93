"""NOLA adapters: storage format, deterministic materialization, digest, import.

NOLA (Koohpayegani et al., ICLR 2024) re-parameterizes each LoRA factor as a
linear combination of random matrices: for a factor of shape (out, in) with
`n` coefficients `c` and a seed `s`, the reference code seeds the global RNG
with `s`, fills a (n, out, in) tensor with one `uniform_(-1, 1)`, multiplies
it by 1/sqrt(n), and takes `einsum('b,boi->oi', c, basis)`. In its LLaMA code
A (in -> r) additionally carries a frozen matrix (`lora_A.weight`, a kaiming
uniform init drawn from the global RNG at construction, *not* from a seed),
so the effective A is generated + init; B's frozen matrix is zeros. Its
checkpoints hold, per target module, `...lora_A.seed` (int64, shape [1]),
`...lora_A.coefficients` (num_basis,), `...lora_A.weight`, and the same for
`lora_B`. The reference draws the basis on the coefficients' device, so a
CPU and a CUDA run give different factors for one seed.

Storage format (`nola.safetensors`, media type NOLA_SAFETENSORS_MEDIA_TYPE),
per target module path `<m>` (e.g. `model.layers.0.self_attn.q_proj`), each
name prefixed with `base_model.model.` like PEFT's (so `<p>` = `base_model.model.<m>`):

- `<p>.nola_A.coefficients` F32 (num_basis_a,), `<p>.nola_B.coefficients` F32 (num_basis_b,)
- `<p>.nola_A.seed`, `<p>.nola_B.seed` I64 shape [1]
- `<p>.nola_A.shape` I64 [r, in], `<p>.nola_B.shape` I64 [out, r]
- `<p>.nola_A.init` F32 (r, in), only when the spec's `init_a` is true: the
  reference does not regenerate its A init from a seed, so it is stored.

with an `adapter_config.json` next to it: `{"peft_type": "NOLA", "r",
"lora_alpha", "num_basis_a", "num_basis_b", "init_a", "fan_in_fan_out",
"target_modules", "base_model_name_or_path", "task_type"}`.

Materialization (always on the CPU, generator "torch-cpu-mt19937"), for one
factor with coefficients c (n,), seed s, shape (o, i):

1. `g = torch.Generator(device="cpu").manual_seed(s)`.
2. Bases are drawn in chunks of k = max(1, CHUNK_ELEMENTS // (o * i))
   consecutive basis matrices: `torch.empty(k, o, i).uniform_(-1, 1, generator=g)`
   (the last chunk smaller). The CPU generator is consumed serially, so any
   chunking yields the same values as one (n, o, i) draw. Each chunk is
   multiplied in fp32 by the Python float 1/sqrt(n).
3. An fp64 accumulator (o, i) starts at zero; for b = 0, 1, ..., n-1 in order,
   `acc += float64(basis[b]) * float64(c[b])` (a multiply, then an add:
   correctly rounded elementwise operations, so the result does not depend
   on the chunk size, the SIMD width or the thread count).
4. The factor is `acc` rounded to fp32; A adds its fp32 init when `init_a`.

`factors_digest` = "sha256:" + sha256 over, for each module in sorted order,
the materialized A then B as contiguous fp32 little-endian bytes (row-major).
The scaling is alpha / r, applied by the LoRA layer, not baked into factors.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from peftreg.adapters.documents import NolaDocument, TargetDocument, target_document
from peftreg.adapters.schema import AdapterConfig, NolaSpec
from peftreg.formats.safetensors_header import SafetensorsHeader
from peftreg.sdk.errors import InvalidRequest

CHUNK_ELEMENTS = 1 << 24  # 64 MiB of fp32 basis per chunk
PEFT_PREFIX = "base_model.model."
_REFERENCE_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<factor>[AB])"
    r"(?:\.(?P<adapter>[^.]+))?\.(?P<what>seed|coefficients|weight)$"
)


class NolaError(InvalidRequest):
    """A NOLA file or checkpoint that cannot be used; the message says why."""


class NolaDigestMismatch(NolaError):
    """Materialized factors that do not hash to the digest the config records."""


def generate_factor(coefficients: torch.Tensor, seed: int, shape: tuple[int, int]) -> torch.Tensor:
    """sum_b c[b] * basis_b, basis from the pinned CPU generator (see the module doc)."""
    coeffs = [float(x) for x in coefficients.detach().to("cpu", torch.float32).reshape(-1)]
    n = len(coeffs)
    out_dim, in_dim = shape
    if n == 0:
        raise NolaError("a NOLA factor needs at least one coefficient")
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    scale = 1.0 / math.sqrt(n)
    acc = torch.zeros(out_dim, in_dim, dtype=torch.float64)
    chunk = max(1, CHUNK_ELEMENTS // max(1, out_dim * in_dim))
    for start in range(0, n, chunk):
        count = min(chunk, n - start)
        basis = torch.empty(count, out_dim, in_dim, dtype=torch.float32)
        basis.uniform_(-1.0, 1.0, generator=generator)
        basis.mul_(scale)
        for j in range(count):
            acc.add_(basis[j].to(torch.float64).mul_(coeffs[start + j]))
    return acc.to(torch.float32)


def nola_key(module: str, factor: str, what: str) -> str:
    """`base_model.model.<module>.nola_<factor>.<what>`."""
    return f"{PEFT_PREFIX}{module}.nola_{factor}.{what}"


def _modules(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    suffix = ".nola_A.seed"
    return sorted(
        name[len(PEFT_PREFIX) : -len(suffix)]
        for name in tensors
        if name.endswith(suffix) and name.startswith(PEFT_PREFIX)
    )


def _get(tensors: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in tensors:
        raise NolaError(f"nola.safetensors lacks {name}")
    return tensors[name]


def _shape(tensors: Mapping[str, torch.Tensor], name: str) -> tuple[int, int]:
    value = _get(tensors, name).reshape(-1).tolist()
    if len(value) != 2 or any(int(v) <= 0 for v in value):
        raise NolaError(f"{name} must hold two positive sizes, not {value}")
    return int(value[0]), int(value[1])


def materialize_factors(
    tensors: Mapping[str, torch.Tensor], init_a: bool
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A (r, in), B (out, r)) in fp32, without checking any digest."""
    modules = _modules(tensors)
    if not modules:
        raise NolaError("nola.safetensors holds no <module>.nola_A.seed tensors")
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module in modules:
        shape_a = _shape(tensors, nola_key(module, "A", "shape"))
        shape_b = _shape(tensors, nola_key(module, "B", "shape"))
        if shape_a[0] != shape_b[1]:
            raise NolaError(f"{module}: A shape {shape_a} and B shape {shape_b} disagree on r")
        a = generate_factor(
            _get(tensors, nola_key(module, "A", "coefficients")),
            int(_get(tensors, nola_key(module, "A", "seed")).reshape(-1)[0]),
            shape_a,
        )
        if init_a:
            init = _get(tensors, nola_key(module, "A", "init")).to(torch.float32)
            if tuple(init.shape) != shape_a:
                raise NolaError(f"{module}.nola_A.init has shape {list(init.shape)}, not {shape_a}")
            a = a + init
        b = generate_factor(
            _get(tensors, nola_key(module, "B", "coefficients")),
            int(_get(tensors, nola_key(module, "B", "seed")).reshape(-1)[0]),
            shape_b,
        )
        factors[module] = (a, b)
    return factors


def factors_digest(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> str:
    """sha256 over sorted modules, A then B, contiguous fp32 little-endian bytes."""
    hasher = hashlib.sha256()
    for module in sorted(factors):
        for factor in factors[module]:
            array = factor.detach().to("cpu", torch.float32).contiguous().numpy()
            hasher.update(array.astype("<f4", copy=False).tobytes())
    return f"sha256:{hasher.hexdigest()}"


def _load(tensors: Mapping[str, torch.Tensor] | Path | str) -> Mapping[str, torch.Tensor]:
    if isinstance(tensors, Path | str):
        from peftreg.adapters.peft_import import read_safetensors_header

        read_safetensors_header(Path(tensors))  # strict check before loading
        return load_file(str(tensors), device="cpu")
    return tensors


def materialize(
    config: AdapterConfig | NolaSpec, nola_tensors: Mapping[str, torch.Tensor] | Path | str
) -> dict[str, torch.Tensor]:
    """PEFT LoRA tensors (`base_model.model.<m>.lora_A.weight`, ...) of a NOLA adapter.

    Raises `NolaDigestMismatch` when the factors differ from the recorded digest.
    """
    spec = config.nola if isinstance(config, AdapterConfig) else config
    if spec is None:
        raise NolaError("the adapter config has no nola section")
    factors = materialize_factors(_load(nola_tensors), spec.init_a)
    actual = factors_digest(factors)
    if actual != spec.factors_digest:
        raise NolaDigestMismatch(
            f"NOLA factors of {len(factors)} modules materialize to {actual}, but the adapter "
            f"records {spec.factors_digest}; refusing a reconstruction that differs "
            "(tampered coefficients or a different generator)"
        )
    result: dict[str, torch.Tensor] = {}
    for module, (a, b) in factors.items():
        result[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.contiguous()
        result[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.contiguous()
    return result


def compression_ratio(config: AdapterConfig) -> float:
    """Materialized LoRA parameters per stored NOLA parameter."""
    if config.nola is None:
        raise NolaError("not a NOLA adapter")
    return config.nola.materialized_parameters / config.nola.stored_parameters


def nola_config_parts(
    peft_config: dict[str, Any], tensors_path: Path, header: SafetensorsHeader
) -> tuple[list[TargetDocument], NolaDocument, int]:
    """Targets, the NolaSpec document (with the digest computed here) and stored
    parameters."""
    del header  # validated by the caller before this load
    tensors = load_file(str(tensors_path), device="cpu")
    try:
        alpha = float(peft_config["lora_alpha"])
        init_a = bool(peft_config.get("init_a", False))
        conv1d = bool(peft_config.get("fan_in_fan_out", False))
    except (KeyError, TypeError, ValueError):
        raise NolaError("adapter_config.json of a NOLA adapter needs lora_alpha") from None
    factors = materialize_factors(tensors, init_a)
    targets: list[TargetDocument] = []
    stored = materialized = 0
    basis_a: set[int] = set()
    basis_b: set[int] = set()
    for module, (a, b) in factors.items():
        rank = a.shape[0]
        targets.append(
            target_document(module, "conv1d" if conv1d else "linear", rank, alpha, alpha / rank)
        )
        coeff_a = tensors[nola_key(module, "A", "coefficients")].numel()
        coeff_b = tensors[nola_key(module, "B", "coefficients")].numel()
        basis_a.add(coeff_a)
        basis_b.add(coeff_b)
        stored += coeff_a + coeff_b + (a.numel() if init_a else 0)
        materialized += a.numel() + b.numel()
    if len(basis_a) != 1 or len(basis_b) != 1:
        raise NolaError(
            f"every module must have the same number of bases (A: {sorted(basis_a)}, "
            f"B: {sorted(basis_b)})"
        )
    spec = NolaSpec(
        num_basis_a=basis_a.pop(),
        num_basis_b=basis_b.pop(),
        init_a=init_a,
        factors_digest=factors_digest(factors),
        materialized_parameters=materialized,
        stored_parameters=stored,
    )
    recorded = peft_config.get("factors_digest")
    if recorded is not None and recorded != spec.factors_digest:
        raise NolaDigestMismatch(
            f"NOLA factors of {len(factors)} modules materialize to {spec.factors_digest}, "
            f"but adapter_config.json records {recorded}"
        )
    return targets, spec.model_dump(mode="json"), stored


def write_nola_directory(
    out_dir: Path,
    tensors: Mapping[str, torch.Tensor],
    peft_config: Mapping[str, Any],
) -> Path:
    """Write nola.safetensors + adapter_config.json into a new directory, atomically."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise NolaError(f"{out_dir} exists and is not an empty directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.peftreg-{uuid.uuid4().hex}"
    try:
        staging.mkdir()
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(staging / "nola.safetensors"),
            metadata={"format": "pt"},
        )
        (staging / "adapter_config.json").write_text(
            json.dumps(dict(peft_config), indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        if out_dir.exists():
            out_dir.rmdir()
        os.rename(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def import_reference_checkpoint(
    checkpoint: Path,
    out_dir: Path,
    *,
    lora_alpha: float,
    base_model_name_or_path: str | None = None,
    fan_in_fan_out: bool = False,
    task_type: str | None = "CAUSAL_LM",
) -> tuple[AdapterConfig, Path]:
    """Convert a NOLA reference-code checkpoint (a safetensors state dict) to our format.

    Keys: `[base_model.model.]<m>.lora_{A,B}[.<adapter>].{seed,coefficients,weight}`.
    The frozen `lora_A.weight` becomes `nola_A.init` when it is not all zeros;
    a non-zero `lora_B.weight` is refused (the format has no B init). The
    bases are regenerated with the CPU generator: a checkpoint whose bases
    were drawn on CUDA does not reproduce and must not be imported this way.
    Pickle checkpoints are never loaded: convert them to safetensors first.
    Returns the AdapterConfig and the written directory.
    """
    from peftreg.adapters.peft_import import (
        PICKLE_SUFFIXES,
        pickle_message,
        read_peft_directory,
        read_safetensors_header,
    )

    checkpoint = Path(checkpoint)
    if checkpoint.suffix.lower() in PICKLE_SUFFIXES:
        raise NolaError(pickle_message(checkpoint.name))
    read_safetensors_header(checkpoint)
    state = load_file(str(checkpoint), device="cpu")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = _REFERENCE_KEY.match(key)
        if match is None:
            continue
        slot = f"{match['factor']}.{match['what']}"
        parts.setdefault(match["module"], {})[slot] = value
    if not parts:
        raise NolaError(f"{checkpoint.name} holds no NOLA lora_A/lora_B seed or coefficients")
    out: dict[str, torch.Tensor] = {}
    init_a = any("A.weight" in p and bool(torch.any(p["A.weight"] != 0)) for p in parts.values())
    ranks: set[int] = set()
    for module, p in sorted(parts.items()):
        for slot in (
            "A.seed",
            "A.coefficients",
            "A.weight",
            "B.seed",
            "B.coefficients",
            "B.weight",
        ):
            if slot not in p:
                raise NolaError(f"{checkpoint.name}: {module} lacks lora_{slot}")
        if bool(torch.any(p["B.weight"] != 0)):
            raise NolaError(f"{module}: lora_B.weight is not zero; peftreg's NOLA has no B init")
        shape_a, shape_b = tuple(p["A.weight"].shape), tuple(p["B.weight"].shape)
        ranks.add(int(shape_a[0]))
        for factor, shape in (("A", shape_a), ("B", shape_b)):
            out[nola_key(module, factor, "coefficients")] = (
                p[f"{factor}.coefficients"].to(torch.float32).reshape(-1)
            )
            out[nola_key(module, factor, "seed")] = p[f"{factor}.seed"].to(torch.int64).reshape(1)
            out[nola_key(module, factor, "shape")] = torch.tensor(shape, dtype=torch.int64)
        if init_a:
            out[nola_key(module, "A", "init")] = p["A.weight"].to(torch.float32)
    if len(ranks) != 1:
        raise NolaError(f"modules have different ranks {sorted(ranks)}")
    modules = sorted(parts)
    peft_config = {
        "peft_type": "NOLA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": ranks.pop(),
        "lora_alpha": lora_alpha,
        "num_basis_a": int(out[nola_key(modules[0], "A", "coefficients")].numel()),
        "num_basis_b": int(out[nola_key(modules[0], "B", "coefficients")].numel()),
        "init_a": init_a,
        "fan_in_fan_out": fan_in_fan_out,
        "target_modules": modules,
    }
    written = write_nola_directory(out_dir, out, peft_config)
    return read_peft_directory(written).config, written
