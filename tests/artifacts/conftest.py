"""A registry process shared by a module, a tiny Llama base model, and adapter builders.

Adapters are built here over plain HTTP (config JSON + safetensors bytes),
independent of the library's PEFT import code.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from click.testing import CliRunner, Result
from safetensors.torch import save

from peftreg.adapters.schema import (
    ADAPTER_CONFIG_MEDIA_TYPE,
    SAFETENSORS_MEDIA_TYPE,
    AdapterConfig,
    BaseReference,
    TargetModule,
    TensorSpec,
)
from peftreg.cli.main import cli
from peftreg.manifest import ADAPTER_ARTIFACT, OCI_MANIFEST, TITLE_ANNOTATION, canonical_json
from tests.fixtures.cli import CliEnv
from tests.fixtures.server import RegistryProcess

HIDDEN, KV, VOCAB = 16, 8, 64
Q_PROJ = "model.layers.0.self_attn.q_proj"
K_PROJ = "model.layers.0.self_attn.k_proj"
# module -> (out, in) in the tiny Llama below
SHAPES = {Q_PROJ: (HIDDEN, HIDDEN), K_PROJ: (KV, HIDDEN)}
DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def http(server: RegistryProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@dataclass
class Cli:
    env: dict[str, str]

    def __call__(self, *args: str) -> Result:
        return CliRunner().invoke(cli, list(args), env=self.env)


@pytest.fixture(scope="module")
def run_cli(server: RegistryProcess, tmp_path_factory: pytest.TempPathFactory) -> Cli:
    root = tmp_path_factory.mktemp("cli")
    return Cli(CliEnv.for_registry(server.url, root, PEFTREG_TOKEN="", PEFTREG_OFFLINE="").env)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer Llama saved in several safetensors shards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    directory = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(
        directory, safe_serialization=True, max_shard_size="6KB"
    )
    return directory


@pytest.fixture(scope="module")
def base_fingerprint(tiny_llama: Path, run_cli: Cli) -> str:
    result = run_cli("base", "push", str(tiny_llama), "acme/tiny-llama:v1", "--json")
    assert result.exit_code == 0, result.output
    return str(json.loads(result.output)["fingerprint"])


def lora_tensors(
    modules: dict[str, tuple[int, int]], rank: int, *, dora: bool = False, scale: float = 1.0
) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(rank)
    for module, (out_features, in_features) in modules.items():
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A.weight"] = (
            torch.randn(rank, in_features, generator=generator) * scale
        )
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator)
        if dora:
            tensors[f"{prefix}.lora_magnitude_vector"] = torch.ones(out_features)
    return tensors


def adapter_config(
    tensors: dict[str, torch.Tensor],
    targets: dict[str, int],
    *,
    kind: str = "lora",
    fingerprint: str | None = None,
    quantization: str = "none",
    **extra: Any,
) -> AdapterConfig:
    specs = [
        TensorSpec(name=name, dtype=DTYPES[t.dtype], shape=tuple(t.shape))
        for name, t in sorted(tensors.items())
    ]
    return AdapterConfig(
        kind=kind,  # type: ignore[arg-type]
        base=BaseReference(name="tiny-llama", fingerprint=fingerprint, quantization=quantization),  # type: ignore[arg-type]
        rank=max(targets.values()) if targets else None,
        alpha=16.0,
        targets=[
            TargetModule(module=m, rank=r, alpha=16.0, scaling=16.0 / r) for m, r in targets.items()
        ],
        dtype="F32",
        parameters=sum(t.numel() for t in tensors.values()),
        bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
        tensors=specs,
        peft_config={"peft_type": "LORA", "r": max(targets.values()) if targets else 0},
        **extra,
    )


def push_blob(http: httpx.Client, repository: str, data: bytes) -> str:
    digest = sha256(data)
    response = http.post(
        f"/v2/{repository}/blobs/uploads/", params={"digest": digest}, content=data
    )
    assert response.status_code == 201, response.text
    return digest


def push_adapter(
    http: httpx.Client,
    repository: str,
    tag: str,
    config: AdapterConfig | bytes,
    weights: bytes,
    *,
    title: str = "adapter_model.safetensors",
    config_media_type: str = ADAPTER_CONFIG_MEDIA_TYPE,
) -> httpx.Response:
    """Push the config and weights blobs, then PUT the adapter manifest; the PUT's response."""
    config_bytes = (
        config if isinstance(config, bytes) else canonical_json(config.model_dump(mode="json"))
    )
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ADAPTER_ARTIFACT,
        "config": {
            "mediaType": config_media_type,
            "digest": push_blob(http, repository, config_bytes),
            "size": len(config_bytes),
        },
        "layers": [
            {
                "mediaType": SAFETENSORS_MEDIA_TYPE,
                "digest": push_blob(http, repository, weights),
                "size": len(weights),
                "annotations": {TITLE_ANNOTATION: title},
            }
        ],
    }
    return http.put(
        f"/v2/{repository}/manifests/{tag}",
        content=canonical_json(manifest),
        headers={"Content-Type": OCI_MANIFEST},
    )


def push_lora(
    http: httpx.Client,
    repository: str,
    tag: str,
    modules: dict[str, tuple[int, int]],
    rank: int,
    *,
    kind: str = "lora",
    fingerprint: str | None = None,
    scale: float = 1.0,
) -> httpx.Response:
    tensors = lora_tensors(modules, rank, dora=kind == "dora", scale=scale)
    config = adapter_config(
        tensors, dict.fromkeys(modules, rank), kind=kind, fingerprint=fingerprint
    )
    return push_adapter(http, repository, tag, config, save(tensors, {"format": "pt"}))


def error(response: httpx.Response) -> tuple[str, str]:
    entry = response.json()["errors"][0]
    return entry["code"], entry["message"]
