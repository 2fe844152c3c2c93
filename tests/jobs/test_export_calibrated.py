"""GPTQ / AWQ exports as jobs on a real server: `--calibration REF` names a pushed text or
JSONL artifact, recorded in the recipe and the idempotency key by digest; unusable
calibration artifacts are refused at the request (422), before any work."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftreg.adapters.base_package import push_base
from peftreg.checkpoint.package import CHECKPOINT_CONFIG_MEDIA_TYPE
from peftreg.sdk.client import Client
from tests.fixtures.schemas import assert_valid_config
from tests.fixtures.server import RegistryProcess
from tests.gguf.models import corpus
from tests.jobs.artifacts import TARGETS
from tests.merge.builders import peft_merged, save_adapter
from tests.quantize.tiny_calibrated import tiny_llama_with_tokenizer

WAIT = 240.0
LOGIT_RELATIVE_FROBENIUS_BOUND = 0.25  # client/quantize/encoder.py's INT4 bound


@pytest.fixture
def client(registry_server: RegistryProcess, tmp_path: Path) -> Client:
    return Client(registry_server.url, cache=tmp_path / "cache")


def _push_sources(client: Client, root: Path) -> tuple[torch.nn.Module, Path]:
    model = tiny_llama_with_tokenizer(root / "base")
    adapter = save_adapter(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), root / "adapter", seed=5
    )
    push_base(client, root / "base", "acme/base:v1")
    client.push(adapter, "acme/bot:v1", base=client.base_reference("acme/base:v1"))
    return model, adapter


def _push_file(client: Client, path: Path, data: bytes, reference: str) -> str:
    path.write_bytes(data)
    client.push(path, reference)
    return str(client.resolve(reference))


def test_gptq_export_job_calibrates_on_a_pushed_artifact(
    run,  # type: ignore[no-untyped-def]
    client: Client,
    tmp_path: Path,
) -> None:
    model, adapter = _push_sources(client, tmp_path)
    lines = [json.dumps({"text": part}) for part in corpus(40_000).split("\n\n") if part.strip()]
    calibration = _push_file(
        client, tmp_path / "calib.jsonl", "\n".join(lines).encode(), "acme/calib:v1"
    )

    request = (
        "export",
        "acme/bot:v1",
        "--base",
        "acme/base:v1",
        "--merge",
        "--quantize",
        "int4",
        "--group-size",
        "64",
        "--algorithm",
        "gptq",
        "--calibration",
        "acme/calib:v1",
        "--calibration-samples",
        "8",
        "--max-sequence-length",
        "64",
    )
    result = run(*request, "--wait", "--timeout", str(WAIT), "--json")
    assert result.exit_code == 0, result.output
    job = json.loads(result.stdout)
    reference = job["result"]["reference"]
    assert job["result"]["quantization"] == "int4"

    output = tmp_path / "int4"
    client.pull(reference, output)
    quantization = json.loads((output / "config.json").read_text())["quantization_config"]
    assert quantization["format"] == "pack-quantized"
    assert quantization["config_groups"]["group_0"]["weights"]["group_size"] == 64
    assert quantization["ignore"] == ["lm_head"]
    loaded = AutoModelForCausalLM.from_pretrained(str(output)).eval()
    expected = peft_merged(model, adapter)
    tokenizer = AutoTokenizer.from_pretrained(str(output))
    ids = torch.tensor([tokenizer(corpus(60_000)[50_000:52_000])["input_ids"][:64]])
    with torch.no_grad():
        got, want = loaded(ids).logits, expected(ids).logits
    assert bool(torch.isfinite(got).all())
    assert float((got - want).norm() / want.norm()) < LOGIT_RELATIVE_FROBENIUS_BOUND

    manifest = json.loads(client.get_manifest(reference).content)
    recipe = json.loads(client.get_blob("acme/bot", manifest["config"]["digest"]))
    assert_valid_config(recipe, CHECKPOINT_CONFIG_MEDIA_TYPE)
    assert recipe["quantization"]["algorithm"] == "gptq"
    recorded = recipe["quantization"]["calibration"]
    calib_manifest = json.loads(client.get_manifest("acme/calib:v1").content)
    assert recorded["repository"] == "acme/calib"
    assert recorded["digest"] == calibration
    assert recorded["file"] == "calib.jsonl"
    assert recorded["file_digest"] == calib_manifest["layers"][0]["digest"]
    assert (recorded["samples"], recorded["max_sequence_length"]) == (8, 64)
    assert "llmcompressor" in recipe["libraries"]

    # The same request is the same job; other calibration text is another job.
    again, created = client.export(
        "acme/bot:v1",
        "acme/base:v1",
        quantize="int4",
        group_size=64,
        algorithm="gptq",
        calibration=f"acme/calib@{calibration}",
        calibration_samples=8,
        max_sequence_length=64,
    )
    assert not created
    assert again.id == job["id"]
    _push_file(client, tmp_path / "other.txt", b"Other text to calibrate on.", "acme/calib:v2")
    other, created_other = client.export(
        "acme/bot:v1",
        "acme/base:v1",
        quantize="int4",
        group_size=64,
        algorithm="gptq",
        calibration="acme/calib:v2",
        calibration_samples=8,
        max_sequence_length=64,
    )
    assert created_other
    assert other.id != job["id"]
    client.cancel_job(other.id)


BAD_CALIBRATION = [
    ("weights.bin", b"\x00\x01binary\x00", "binary"),
    ("empty.txt", b"", "is empty"),
    ("calib.jsonl", b'{"prompt": "x"}\n', 'no string "text"'),
]


def test_unusable_calibration_artifacts_are_refused_at_the_request(
    run,  # type: ignore[no-untyped-def]
    client: Client,
    registry_server: RegistryProcess,
    tmp_path: Path,
) -> None:
    _push_sources(client, tmp_path)
    url = f"{registry_server.url}/api/v1/exports"
    body = {
        "adapters": [{"reference": "acme/bot:v1"}],
        "base": "acme/base:v1",
        "quantize": "int4",
        "algorithm": "awq",
    }
    without = httpx.post(url, json=body, timeout=60)
    assert without.status_code in (400, 422)
    assert "needs calibration" in without.json()["errors"][0]["message"]

    for index, (name, data, cause) in enumerate(BAD_CALIBRATION):
        tag = f"acme/calib:bad{index}"
        digest = _push_file(client, tmp_path / name, data, tag)
        refused = httpx.post(url, json={**body, "calibration": tag}, timeout=60)
        assert refused.status_code == 422, name
        error = refused.json()["errors"][0]
        assert error["code"] == "JOB_INVALID"
        assert cause in error["message"]
        assert f"acme/calib@{digest}" in error["message"]

        result = run(
            "export",
            "acme/bot:v1",
            "--base",
            "acme/base:v1",
            "--merge",
            "--quantize",
            "int4",
            "--algorithm",
            "awq",
            "--calibration",
            tag,
        )
        assert result.exit_code == 1, name
        assert len(result.output.strip().splitlines()) == 1
        assert cause in result.output
    assert client.jobs() == []
