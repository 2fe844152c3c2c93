"""Adapters checked against their config and a registered base; search; base push; diff."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import torch
from safetensors.torch import save

from peftreg.manifest import BASE_ARTIFACT
from tests.artifacts.conftest import (
    K_PROJ,
    Q_PROJ,
    SHAPES,
    Cli,
    adapter_config,
    error,
    lora_tensors,
    push_adapter,
    push_lora,
)

UNKNOWN_BASE = "sha256:" + "0" * 64


def _refused(http: httpx.Client, response: httpx.Response, repo: str, tag: str) -> str:
    assert response.status_code == 422, response.text
    code, message = error(response)
    assert code == "ADAPTER_INVALID", message
    assert http.get(f"/v2/{repo}/manifests/{tag}").status_code == 404
    return message


def test_base_push_of_a_sharded_model(
    http: httpx.Client, tiny_llama: Path, base_fingerprint: str
) -> None:
    shards = sorted(p.name for p in tiny_llama.glob("*.safetensors"))
    assert len(shards) >= 3
    detail = http.get("/api/v1/repositories/acme/tiny-llama/versions/v1").json()
    assert detail["artifact_type"] == BASE_ARTIFACT
    assert detail["adapter"]["kind"] == "base"
    assert detail["adapter"]["fingerprint"] == base_fingerprint
    assert detail["config"]["architecture"] == "LlamaForCausalLM"
    titles = {
        layer["annotations"]["org.opencontainers.image.title"]
        for layer in detail["manifest"]["layers"]
    }
    assert {"config.json", "model.safetensors.index.json", *shards} <= titles


def test_verified_and_unverified(http: httpx.Client, base_fingerprint: str) -> None:
    ok = push_lora(
        http, "acme/bot", "v1", {Q_PROJ: SHAPES[Q_PROJ]}, 4, fingerprint=base_fingerprint
    )
    assert ok.status_code == 201, ok.text
    loose = push_lora(
        http, "acme/bot", "loose", {Q_PROJ: SHAPES[Q_PROJ]}, 4, fingerprint=UNKNOWN_BASE
    )
    assert loose.status_code == 201, loose.text
    verified = http.get("/api/v1/repositories/acme/bot/versions/v1").json()["adapter"]
    assert verified == {
        "kind": "lora",
        "rank": 4,
        "base_fingerprint": base_fingerprint,
        "base_quantization": "none",
        "verified": True,
        "fingerprint": None,
    }
    assert (
        http.get("/api/v1/repositories/acme/bot/versions/loose").json()["adapter"]["verified"]
        is False
    )


def test_shape_mismatch_names_module_and_shapes(http: httpx.Client, base_fingerprint: str) -> None:
    response = push_lora(
        http, "acme/bad", "shape", {Q_PROJ: (16, 12)}, 4, fingerprint=base_fingerprint
    )
    message = _refused(http, response, "acme/bad", "shape")
    for part in (Q_PROJ, "[4, 12]", "[4, 16]"):
        assert part in message, message
    # the same adapter against an unregistered base is accepted, unverified
    assert push_lora(http, "acme/bad", "shape-unverified", {Q_PROJ: (16, 12)}, 4).status_code == 201


def test_transposed_k_proj_is_refused(http: httpx.Client, base_fingerprint: str) -> None:
    response = push_lora(
        http, "acme/bad", "kproj", {K_PROJ: (16, 8)}, 4, fingerprint=base_fingerprint
    )
    message = _refused(http, response, "acme/bad", "kproj")
    for part in (K_PROJ, "[4, 8]", "[4, 16]"):
        assert part in message, message


def test_unknown_target_module(http: httpx.Client, base_fingerprint: str) -> None:
    module = "model.layers.0.self_attn.nope_proj"
    response = push_lora(
        http, "acme/bad", "unknown", {module: (16, 16)}, 4, fingerprint=base_fingerprint
    )
    message = _refused(http, response, "acme/bad", "unknown")
    assert module in message
    assert "does not exist in the base" in message


def test_nan_names_the_tensor(http: httpx.Client) -> None:
    tensors = lora_tensors({Q_PROJ: SHAPES[Q_PROJ]}, 4)
    name = f"base_model.model.{Q_PROJ}.lora_B.weight"
    tensors[name][1, 2] = float("nan")
    config = adapter_config(tensors, {Q_PROJ: 4})
    response = push_adapter(http, "acme/bad", "nan", config, save(tensors))
    message = _refused(http, response, "acme/bad", "nan")
    assert name in message
    assert "NaN" in message
    tensors[name][1, 2] = float("inf")
    response = push_adapter(http, "acme/bad", "inf", config, save(tensors))
    assert "Inf" in _refused(http, response, "acme/bad", "inf")


def test_config_and_file_disagree(http: httpx.Client) -> None:
    tensors = lora_tensors({Q_PROJ: SHAPES[Q_PROJ], K_PROJ: SHAPES[K_PROJ]}, 4)
    config = adapter_config(tensors, {Q_PROJ: 4, K_PROJ: 4})
    missing_b = {k: v for k, v in tensors.items() if not k.endswith(f"{K_PROJ}.lora_B.weight")}
    config_b = adapter_config(missing_b, {Q_PROJ: 4, K_PROJ: 4})
    message = _refused(
        http, push_adapter(http, "acme/bad", "nob", config_b, save(missing_b)), "acme/bad", "nob"
    )
    assert K_PROJ in message
    assert "lora_B" in message
    undeclared = adapter_config(tensors, {Q_PROJ: 4})
    message = _refused(
        http,
        push_adapter(http, "acme/bad", "undeclared", undeclared, save(tensors)),
        "acme/bad",
        "undeclared",
    )
    assert K_PROJ in message
    assert "does not declare" in message
    half = adapter_config({k: v for k, v in tensors.items() if Q_PROJ in k}, {Q_PROJ: 4})
    message = _refused(
        http, push_adapter(http, "acme/bad", "extra", half, save(tensors)), "acme/bad", "extra"
    )
    assert "not in the config" in message
    doubles = {k: v.to(torch.float64) for k, v in tensors.items()}
    config64 = adapter_config({k: v.float() for k, v in doubles.items()}, {Q_PROJ: 4, K_PROJ: 4})
    config64 = config64.model_copy(
        update={"tensors": [t.model_copy(update={"dtype": "F64"}) for t in config64.tensors]}
    )
    message = _refused(
        http, push_adapter(http, "acme/bad", "f64", config64, save(doubles)), "acme/bad", "f64"
    )
    assert "F64" in message
    assert "not supported" in message
    bad_config = _refused(
        http,
        push_adapter(http, "acme/bad", "cfg", b'{"kind": "lora"}', save(tensors)),
        "acme/bad",
        "cfg",
    )
    assert "AdapterConfig" in bad_config
    assert push_adapter(http, "acme/bad", "ok", config, save(tensors)).status_code == 201


def test_search_filters_api_and_cli(
    http: httpx.Client, run_cli: Cli, base_fingerprint: str
) -> None:
    modules = {Q_PROJ: SHAPES[Q_PROJ]}
    for tag, rank, kind, fingerprint in (
        ("r4", 4, "lora", base_fingerprint),
        ("d8", 8, "dora", base_fingerprint),
        ("r32", 16 * 2, "lora", base_fingerprint),
        ("other", 4, "lora", UNKNOWN_BASE),
    ):
        response = push_lora(
            http, "search/ad", tag, modules, rank, kind=kind, fingerprint=fingerprint
        )
        assert response.status_code == 201, response.text

    def tags(**params: object) -> set[str]:
        items = http.get("/api/v1/repositories/search/ad/versions", params=params).json()["items"]
        return {tag for item in items for tag in item["tags"]}

    assert tags() == {"r4", "d8", "r32", "other"}
    assert tags(kind="dora") == {"d8"}
    assert tags(base=base_fingerprint) == {"r4", "d8", "r32"}
    assert tags(base=base_fingerprint, max_rank=8) == {"r4", "d8"}
    assert tags(verified="false") == {"other"}
    assert tags(base_quantization="nf4") == set()
    everywhere = http.get("/api/v1/versions", params={"kind": "dora"}).json()["items"]
    assert [item["tags"] for item in everywhere if item["repository"] == "search/ad"] == [["d8"]]

    result = run_cli(
        "ls",
        "search",
        "--base",
        "acme/tiny-llama:v1",
        "--kind",
        "lora",
        "--max-rank",
        "16",
        "--json",
    )
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    assert {tag for item in listed for tag in item["tags"]} == {"r4"}
    assert listed[0]["adapter"]["base_fingerprint"] == base_fingerprint
    result = run_cli("ls", "search", "--base", base_fingerprint, "--max-rank", "8")
    assert result.exit_code == 0, result.output
    assert "dora" in result.output
    assert "r32" not in result.output

    shown = run_cli("show", "search/ad:d8")
    assert shown.exit_code == 0, shown.output
    assert "kind:          dora" in shown.output
    assert f"{base_fingerprint} (verified)" in shown.output
    assert "rank:          8" in shown.output
    assert Q_PROJ in shown.output


def test_diff(http: httpx.Client, run_cli: Cli) -> None:
    modules = {Q_PROJ: SHAPES[Q_PROJ]}
    assert push_lora(http, "acme/diff", "a", modules, 4).status_code == 201
    assert push_lora(http, "acme/diff", "b", modules, 4, scale=1.5).status_code == 201
    wider = {**modules, K_PROJ: SHAPES[K_PROJ]}
    assert push_lora(http, "acme/diff", "c", wider, 8).status_code == 201

    same = json.loads(run_cli("diff", "acme/diff:a", "acme/diff:b", "--json").output)
    a_name = f"base_model.model.{Q_PROJ}.lora_A.weight"
    b_name = f"base_model.model.{Q_PROJ}.lora_B.weight"
    assert abs(same["relative_change"][a_name] - 0.5) < 1e-6
    assert same["relative_change"][b_name] == 0.0
    assert same["targets_added"] == []
    assert same["kind"] == ["lora", "lora"]

    result = run_cli("diff", "acme/diff:a", "acme/diff:c")
    assert result.exit_code == 0, result.output
    assert "rank:    4 -> 8" in result.output
    assert f"+ target {K_PROJ}" in result.output
    assert "shape/dtype differs" in result.output


def test_adapter_type_without_its_config_is_refused(http: httpx.Client) -> None:
    """Claiming the adapter artifact type with another config would skip validation."""
    tensors = lora_tensors({Q_PROJ: SHAPES[Q_PROJ]}, 4)
    tensors[next(iter(tensors))][0, 0] = float("nan")
    response = push_adapter(
        http,
        "acme/sneaky",
        "latest",
        b"{}",
        save(tensors),
        config_media_type="application/vnd.oci.empty.v1+json",
    )
    message = _refused(http, response, "acme/sneaky", "latest")
    assert "application/vnd.peftreg.adapter.config.v1+json" in message
