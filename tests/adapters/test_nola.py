"""NOLA: deterministic CPU materialization, digest checks, reference import, PEFT export."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from peftreg.adapters import nola
from peftreg.adapters.nola import (
    NolaDigestMismatch,
    compression_ratio,
    factors_digest,
    generate_factor,
    import_reference_checkpoint,
    materialize,
    materialize_factors,
)
from peftreg.adapters.peft_import import read_peft_directory
from peftreg.adapters.schema import NOLA_SAFETENSORS_MEDIA_TYPE
from peftreg.sdk import errors
from tests.adapters.documents import assert_document_is_the_model
from tests.adapters.tiny_models import LLAMA_NAME, same_weights, sample_ids, tiny_llama
from tests.fixtures.cli import CliEnv
from tests.fixtures.server import RegistryProcess

MODULES = {  # module -> (in, out) of the tiny Llama
    "model.layers.0.self_attn.q_proj": (32, 32),
    "model.layers.0.self_attn.v_proj": (32, 16),
    "model.layers.1.self_attn.q_proj": (32, 32),
    "model.layers.1.self_attn.v_proj": (32, 16),
}
RANK, ALPHA, BASIS_A, BASIS_B = 4, 8.0, 24, 16


def reference_checkpoint(path: Path, *, init_a: bool) -> Path:
    """A state dict shaped like the NOLA reference LLaMA code's, as safetensors."""
    g = torch.Generator().manual_seed(3)
    state: dict[str, torch.Tensor] = {}
    for index, (module, (in_dim, out_dim)) in enumerate(MODULES.items()):
        prefix = f"base_model.model.{module}"
        a_init = torch.empty(RANK, in_dim).uniform_(-0.2, 0.2, generator=g)
        state[f"{prefix}.lora_A.weight"] = a_init if init_a else torch.zeros(RANK, in_dim)
        state[f"{prefix}.lora_B.weight"] = torch.zeros(out_dim, RANK)
        state[f"{prefix}.lora_A.seed"] = torch.tensor([1_000_003 * (index + 1)], dtype=torch.int64)
        state[f"{prefix}.lora_B.seed"] = torch.tensor([9_876_543_210 + index], dtype=torch.int64)
        state[f"{prefix}.lora_A.coefficients"] = torch.randn(BASIS_A, generator=g)
        state[f"{prefix}.lora_B.coefficients"] = torch.randn(BASIS_B, generator=g)
    save_file(state, str(path))
    return path


def reference_factor(coefficients: torch.Tensor, seed: int, shape: tuple[int, int]) -> torch.Tensor:
    """The reference code's math: one uniform_ draw of (n, out, in), 1/sqrt(n), einsum."""
    n = coefficients.numel()
    g = torch.Generator(device="cpu").manual_seed(seed)
    basis = torch.empty(n, *shape).uniform_(-1.0, 1.0, generator=g) * (1.0 / math.sqrt(n))
    return torch.einsum("b,boi->oi", coefficients.float(), basis)


def test_chunked_generation_is_identical_and_matches_the_reference_math(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    coefficients = torch.randn(37, generator=torch.Generator().manual_seed(0))
    whole = generate_factor(coefficients, 12345, (6, 10))
    monkeypatch.setattr(nola, "CHUNK_ELEMENTS", 60 * 5)  # chunks of 5 bases
    chunked = generate_factor(coefficients, 12345, (6, 10))
    monkeypatch.setattr(nola, "CHUNK_ELEMENTS", 1)  # one basis at a time
    single = generate_factor(coefficients, 12345, (6, 10))
    assert torch.equal(whole, chunked)
    assert torch.equal(whole, single)
    reference = reference_factor(coefficients, 12345, (6, 10))
    assert (whole - reference).abs().max().item() < 1e-5


_CHILD = """
import sys, torch
from safetensors.torch import load_file
from peftreg.adapters.nola import materialize_factors, factors_digest
print(factors_digest(materialize_factors(load_file(sys.argv[1]), sys.argv[2] == "1")))
"""


def test_factors_identical_across_processes(tmp_path: Path) -> None:
    config, directory = import_reference_checkpoint(
        reference_checkpoint(tmp_path / "ref.safetensors", init_a=True),
        tmp_path / "nola",
        lora_alpha=ALPHA,
    )
    assert config.nola is not None
    digests = set()
    for threads in ("1", "3"):
        env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONPATH": os.getcwd()}
        child = subprocess.run(
            [sys.executable, "-c", _CHILD, str(directory / "nola.safetensors"), "1"],
            capture_output=True,
            text=True,
            env=env,
            check=True,
            timeout=120,
        )
        digests.add(child.stdout.strip())
    assert digests == {config.nola.factors_digest}


def test_reference_import_config_and_compression(tmp_path: Path) -> None:
    config, directory = import_reference_checkpoint(
        reference_checkpoint(tmp_path / "ref.safetensors", init_a=False),
        tmp_path / "nola",
        lora_alpha=ALPHA,
        base_model_name_or_path=LLAMA_NAME,
    )
    assert config.kind == "nola"
    assert config.rank == RANK
    assert config.alpha == ALPHA
    assert config.base.name == LLAMA_NAME
    assert config.nola is not None
    assert not config.nola.init_a
    assert (config.nola.num_basis_a, config.nola.num_basis_b) == (BASIS_A, BASIS_B)
    materialized = sum(RANK * i + o * RANK for i, o in MODULES.values())
    assert config.nola.materialized_parameters == materialized
    assert config.nola.stored_parameters == len(MODULES) * (BASIS_A + BASIS_B)
    assert compression_ratio(config) == pytest.approx(materialized / (len(MODULES) * 40))
    assert {t.module for t in config.targets} == set(MODULES)
    assert all(t.scaling == ALPHA / RANK for t in config.targets)
    stored = load_file(str(directory / "nola.safetensors"))
    assert stored["base_model.model.model.layers.0.self_attn.v_proj.nola_B.shape"].tolist() == [
        16,
        RANK,
    ]
    assert (
        stored["base_model.model.model.layers.0.self_attn.v_proj.nola_B.seed"].dtype == torch.int64
    )

    with_init, _ = import_reference_checkpoint(
        reference_checkpoint(tmp_path / "ref2.safetensors", init_a=True),
        tmp_path / "nola2",
        lora_alpha=ALPHA,
    )
    assert with_init.nola is not None
    assert with_init.nola.init_a
    assert with_init.nola.factors_digest != config.nola.factors_digest


def test_pickle_checkpoint_is_refused(tmp_path: Path) -> None:
    pickled = tmp_path / "nola.pt"
    pickled.write_bytes(os.urandom(64))
    with pytest.raises(errors.InvalidRequest, match=r"nola\.pt is a pickle file"):
        import_reference_checkpoint(pickled, tmp_path / "out", lora_alpha=ALPHA)


def test_tampered_coefficient_is_caught(tmp_path: Path) -> None:
    config, directory = import_reference_checkpoint(
        reference_checkpoint(tmp_path / "ref.safetensors", init_a=True),
        tmp_path / "nola",
        lora_alpha=ALPHA,
    )
    path = directory / "nola.safetensors"
    assert len(materialize(config, path)) == 2 * len(MODULES)
    tensors = load_file(str(path))
    tensors["base_model.model.model.layers.1.self_attn.q_proj.nola_B.coefficients"][3] += 1e-3
    with pytest.raises(NolaDigestMismatch, match="NOLA factors of 4 modules materialize to"):
        materialize(config, tensors)
    seeds = load_file(str(path))
    seeds["base_model.model.model.layers.0.self_attn.q_proj.nola_A.seed"] += 1
    with pytest.raises(NolaDigestMismatch):
        materialize(config, seeds)


def test_nola_push_pull_exports_materialized_lora(
    server: RegistryProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("PEFTREG_"):
            monkeypatch.delenv(name)
    cli = CliEnv(
        {
            "PEFTREG_URL": server.url,
            "PEFTREG_CACHE": str(tmp_path / "cache"),
            "PEFTREG_CONFIG": str(tmp_path / "config.json"),
            "PEFTREG_RETRIES": "1",
        },
        tmp_path / "cache",
        tmp_path / "config.json",
    )
    checkpoint = reference_checkpoint(tmp_path / "ref.safetensors", init_a=True)
    directory = tmp_path / "nola"
    imported = cli.run(
        "nola",
        "import",
        str(checkpoint),
        str(directory),
        "--alpha",
        str(ALPHA),
        "--base-name",
        LLAMA_NAME,
    )
    assert imported.exit_code == 0, imported.output
    assert "compression" in imported.stdout
    imported_adapter = read_peft_directory(directory)
    assert_document_is_the_model(imported_adapter)
    config = imported_adapter.config
    (directory / "README.md").write_text("# nola\n")
    pushed = cli.run("push", str(directory), "acme/nola:v1", "-q")
    assert pushed.exit_code == 0, pushed.output
    shown = cli.run("show", "acme/nola:v1")
    assert shown.exit_code == 0, shown.output
    assert f"{compression_ratio(config):.1f}x smaller than LoRA" in shown.stdout
    from peftreg import Client

    with Client(server.url) as client:
        detail = client.version("acme/nola:v1")
    assert detail.manifest["layers"][0]["mediaType"] == NOLA_SAFETENSORS_MEDIA_TYPE
    assert detail.manifest["annotations"]["io.peftreg.adapter.kind"] == "nola"
    recorded = detail.config if isinstance(detail.config, dict) else json.loads(detail.config)
    assert recorded["nola"]["factors_digest"] == config.nola.factors_digest  # type: ignore[union-attr]

    out = tmp_path / "peft"
    pulled = cli.run("pull", "acme/nola:v1", "--format", "peft", "-o", str(out), "-q")
    assert pulled.exit_code == 0, pulled.output
    assert "exported NOLA as its materialized LoRA" in pulled.stderr
    assert (out / "README.md").read_text() == "# nola\n"

    # The pulled snapshot materializes to the same factors as the original files.
    plain = cli.run("pull", "acme/nola:v1", "-q")
    snapshot = Path(plain.stdout.strip())
    original = materialize_factors(load_file(str(directory / "nola.safetensors")), True)
    again = materialize_factors(load_file(str(snapshot / "nola.safetensors")), True)
    assert factors_digest(again) == factors_digest(original)

    base = tiny_llama()
    manual = same_weights(base)
    loaded = PeftModel.from_pretrained(same_weights(base), str(out)).eval()
    with torch.no_grad():
        modules = dict(manual.named_modules())
        for module, (a, b) in original.items():
            weight = modules[module].weight  # type: ignore[union-attr]
            weight += (b @ a) * (ALPHA / RANK)
        ids = sample_ids()
        want = manual(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
        plain_logits = base(input_ids=ids).logits
    assert (want - plain_logits).abs().max().item() > 1e-3  # the adapter does something
    assert (want - got).abs().max().item() <= 1e-5
