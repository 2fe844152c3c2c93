"""Export jobs end to end on a real server with its embedded worker."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from transformers import AutoModelForCausalLM

from peftreg.checkpoint.package import CHECKPOINT_CONFIG_MEDIA_TYPE
from peftreg.manifest import CHECKPOINT_ARTIFACT
from peftreg.sdk.client import Client
from peftreg.sdk.errors import PeftregError
from peftreg.sdk.jobs import JobFailed, JobInfo
from tests.adapters.tiny_models import sample_ids
from tests.fixtures.schemas import assert_valid_config
from tests.fixtures.server import RegistryProcess, start_registry
from tests.jobs.artifacts import push_base_and_adapter
from tests.merge.builders import peft_merged, save_adapter

WAIT = 120.0
REQUEST_TIMEOUT = 60.0  # a loaded machine answers slowly; the assertions are on the answer


def post(url: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(url, timeout=REQUEST_TIMEOUT, **kwargs)


@pytest.fixture
def client(registry_server: RegistryProcess, tmp_path: Path) -> Client:
    return Client(registry_server.url, cache=tmp_path / "cache")


def test_export_publishes_a_merged_checkpoint_with_provenance(
    client: Client, tmp_path: Path
) -> None:
    pushed = push_base_and_adapter(client, tmp_path)
    job, created = client.export(pushed.adapter_ref, pushed.base_ref)
    assert created
    assert job.status in ("queued", "running")
    done = client.wait_job(job.id, timeout=WAIT)
    assert done.result is not None
    reference = done.result["reference"]

    # The checkpoint loads with transformers and equals peft's merge_and_unload.
    output = tmp_path / "out"
    client.pull(reference, output)
    loaded = AutoModelForCausalLM.from_pretrained(str(output)).eval()
    expected = peft_merged(pushed.model, pushed.adapter_dir)
    ids = sample_ids()
    with torch.no_grad():
        difference = (loaded(ids).logits - expected(ids).logits).abs().max().item()
    assert difference <= 1e-5
    for name, value in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value) or (
            (loaded.state_dict()[name] - value).abs().max().item() <= 1e-6
        ), name

    # Provenance: subject is the adapter, the recipe names every input.
    adapter_digest = client.resolve(pushed.adapter_ref)
    referrers = client.referrers("acme/bot", adapter_digest)
    exports = [r for r in referrers if r.get("artifactType") == CHECKPOINT_ARTIFACT]
    assert [r["digest"] for r in exports] == [done.result["digest"]]
    manifest = json.loads(client.get_manifest(reference).content)
    assert manifest["subject"]["digest"] == str(adapter_digest)
    assert manifest["config"]["mediaType"] == CHECKPOINT_CONFIG_MEDIA_TYPE
    recipe = json.loads(client.get_blob("acme/bot", manifest["config"]["digest"]))
    assert_valid_config(recipe, CHECKPOINT_CONFIG_MEDIA_TYPE)
    assert recipe["base"]["digest"] == str(client.resolve(pushed.base_ref))
    assert recipe["adapters"] == [
        {"repository": "acme/bot", "digest": str(adapter_digest), "weight": 1.0}
    ]
    assert recipe["job"] == job.id
    assert {"peftreg", "torch", "safetensors"} <= set(recipe["libraries"])
    titles = {
        layer["annotations"]["org.opencontainers.image.title"] for layer in manifest["layers"]
    }
    assert {"config.json", "model.safetensors"} <= titles

    # The same request: the same job and the same artifact, nothing recomputed.
    again, created_again = client.export(pushed.adapter_ref, pushed.base_ref)
    assert not created_again
    assert again.id == job.id
    assert again.result == done.result
    assert len(client.jobs(kind="export")) == 1
    logs = [line.line for line in client.job_logs(job.id)]
    assert "succeeded" in logs


def test_two_identical_concurrent_requests_give_one_job(client: Client, tmp_path: Path) -> None:
    pushed = push_base_and_adapter(client, tmp_path)
    barrier = threading.Barrier(2)

    def request(_: int) -> tuple[JobInfo, bool]:
        barrier.wait()
        return client.export(pushed.adapter_ref, pushed.base_ref, dtype="float16")

    with ThreadPoolExecutor(2) as pool:
        (first, first_created), (second, second_created) = pool.map(request, range(2))
    assert second.id == first.id
    assert sorted([first_created, second_created]) == [False, True]
    done = client.wait_job(first.id, timeout=WAIT)
    assert done.result is not None
    adapter_digest = client.resolve(pushed.adapter_ref)
    checkpoints = [
        r
        for r in client.referrers("acme/bot", adapter_digest)
        if r.get("artifactType") == CHECKPOINT_ARTIFACT
    ]
    assert len(checkpoints) == 1
    config = json.loads(client.get_blob("acme/bot", _config_digest(client, done.result)))
    assert config["merge"]["dtype"] == "float16"


def _config_digest(client: Client, result: dict[str, str]) -> str:
    manifest = json.loads(client.get_manifest(result["reference"]).content)
    return str(manifest["config"]["digest"])


def test_a_base_of_another_fingerprint_is_refused_before_any_work(
    client: Client, registry_server: RegistryProcess, tmp_path: Path
) -> None:
    pushed = push_base_and_adapter(client, tmp_path, seed=0)
    other = push_base_and_adapter(client, tmp_path, seed=1, repository="acme/other")
    response = post(
        f"{registry_server.url}/api/v1/exports",
        json={"adapters": [{"reference": pushed.adapter_ref}], "base": other.base_ref},
    )
    assert response.status_code == 409
    error = response.json()["errors"][0]
    assert error["code"] == "BASE_INCOMPATIBLE"
    own = client.base_reference(pushed.base_ref).fingerprint
    theirs = client.base_reference(other.base_ref).fingerprint
    assert own is not None
    assert theirs is not None
    assert own in error["message"]
    assert theirs in error["message"]
    assert client.jobs() == []


def test_unknown_base_and_wrong_artifact_types_are_clear(
    client: Client, registry_server: RegistryProcess, tmp_path: Path
) -> None:
    pushed = push_base_and_adapter(client, tmp_path)
    url = f"{registry_server.url}/api/v1/exports"
    missing = post(
        url, json={"adapters": [{"reference": pushed.adapter_ref}], "base": "acme/base:nope"}
    )
    assert missing.status_code == 404
    assert missing.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert "nope" in missing.json()["errors"][0]["message"]
    swapped = post(
        url, json={"adapters": [{"reference": pushed.base_ref}], "base": pushed.adapter_ref}
    )
    assert swapped.status_code == 422
    assert swapped.json()["errors"][0]["code"] == "JOB_INVALID"
    assert "not a registered base" in swapped.json()["errors"][0]["message"]
    nf4 = post(
        url,
        json={
            "adapters": [{"reference": pushed.adapter_ref}],
            "base": pushed.base_ref,
            "base_quantization": "nf4",
        },
    )
    assert nf4.status_code == 422
    assert "not trained against an NF4 base" in nf4.json()["errors"][0]["message"]
    with pytest.raises(PeftregError):
        client.export(pushed.adapter_ref, pushed.base_ref, quantize="int8")
    not_finite = post(
        url,
        content=b'{"adapters": [{"reference": "%s", "weight": NaN}], "base": "%s"}'
        % (pushed.adapter_ref.encode(), pushed.base_ref.encode()),
        headers={"Content-Type": "application/json"},
    )
    assert not_finite.status_code in (400, 422)
    assert "finite" in not_finite.json()["errors"][0]["message"]
    assert client.jobs() == []


def test_a_failed_job_keeps_its_error_and_log(tmp_path: Path) -> None:
    server = start_registry(tmp_path / "home", {"PEFTREG_JOB_MAX_ATTEMPTS": "1"})
    try:
        client = Client(server.url, cache=tmp_path / "cache")
        pushed = push_base_and_adapter(client, tmp_path)
        # The base's weights vanish from the store (an operator error): the job cannot run.
        base = json.loads(client.get_manifest(pushed.base_ref).content)
        (weights,) = [
            layer["digest"]
            for layer in base["layers"]
            if layer["annotations"]["org.opencontainers.image.title"] == "model.safetensors"
        ]
        hex_digest = weights.split(":")[1]
        (server.home / "storage" / "blobs" / "sha256" / hex_digest[:2] / hex_digest).unlink()
        job, _ = client.export(pushed.adapter_ref, pushed.base_ref)
        with pytest.raises(JobFailed) as failed:
            client.wait_job(job.id, timeout=WAIT)
        ended = failed.value.job
        assert ended.status == "failed"
        assert ended.error
        assert ended.attempts == 1
        lines = [line.line for line in client.job_logs(job.id)]
        assert ended.error in lines
        assert client.job(job.id).error == ended.error
    finally:
        server.stop()


def test_int4_export_loads_with_transformers(client: Client, tmp_path: Path) -> None:
    pushed = push_base_and_adapter(client, tmp_path)
    job, _ = client.export(
        pushed.adapter_ref, pushed.base_ref, quantize="int4", group_size=16, algorithm="mse"
    )
    done = client.wait_job(job.id, timeout=WAIT)
    assert done.result is not None
    assert done.result["quantization"] == "int4"
    output = tmp_path / "int4"
    client.pull(done.result["reference"], output)
    config = json.loads((output / "config.json").read_text())
    quantization = config["quantization_config"]
    assert quantization["format"] == "pack-quantized"
    assert quantization["config_groups"]["group_0"]["weights"]["group_size"] == 16
    assert "lm_head" in quantization["ignore"]
    loaded = AutoModelForCausalLM.from_pretrained(str(output)).eval()
    expected = peft_merged(pushed.model, pushed.adapter_dir)
    ids = sample_ids()
    with torch.no_grad():
        got, want = loaded(ids).logits, expected(ids).logits
    assert torch.isfinite(got).all()
    # The bound documented in client/quantize/encoder.py.
    assert (got - want).norm() / want.norm() < 0.25
    manifest = json.loads(client.get_manifest(done.result["reference"]).content)
    recipe = json.loads(client.get_blob("acme/bot", manifest["config"]["digest"]))
    assert_valid_config(recipe, CHECKPOINT_CONFIG_MEDIA_TYPE)
    assert recipe["quantization"]["algorithm"] == "mse"
    assert recipe["quantization"]["group_size"] == 16


def test_cancelling_a_running_export_stops_it_and_publishes_nothing(tmp_path: Path) -> None:
    server = start_registry(
        tmp_path / "home",
        {"PEFTREG_WORKER_THROTTLE_SECONDS": "0.3", "PEFTREG_JOB_LEASE_SECONDS": "1"},
    )
    try:
        client = Client(server.url, cache=tmp_path / "cache")
        pushed = push_base_and_adapter(client, tmp_path)
        job, _ = client.export(pushed.adapter_ref, pushed.base_ref)
        deadline = time.monotonic() + WAIT
        while not (current := client.job(job.id)).progress > 0:
            assert time.monotonic() < deadline, current
            time.sleep(0.05)
        assert client.cancel_job(job.id).cancel_requested
        with pytest.raises(JobFailed) as ended:
            client.wait_job(job.id, timeout=WAIT)
        assert ended.value.job.status == "cancelled"
        adapter = client.resolve(pushed.adapter_ref)
        assert [
            r
            for r in client.referrers("acme/bot", adapter)
            if r.get("artifactType") == CHECKPOINT_ARTIFACT
        ] == []
    finally:
        server.stop()


def test_an_export_whose_adapter_cannot_apply_names_the_reference(
    client: Client, tmp_path: Path
) -> None:
    """A BEFT adapter trains the bias of v_proj, which this Llama has not: the worker's
    merge fails naming the adapter's reference, not the worker's scratch directory."""
    pushed = push_base_and_adapter(client, tmp_path, repository="acme/beft-base", seed=3)
    config = PEFT_TYPE_TO_CONFIG_MAPPING["BEFT"](task_type="CAUSAL_LM")
    adapter_dir = save_adapter(pushed.model, config, tmp_path / "beft")
    client.push(adapter_dir, "acme/beft:v1", base=client.base_reference(pushed.base_ref))
    digest = client.resolve("acme/beft:v1")
    job, _ = client.export("acme/beft:v1", pushed.base_ref)
    with pytest.raises(JobFailed) as failed:
        client.wait_job(job.id, timeout=WAIT)
    error = failed.value.job.error or ""
    assert f"acme/beft@{digest}: peft cannot merge its beft adapter" in error
    assert "Base layer has no bias" in error
    assert "adapter-0" not in error
