"""GGUF through the registry: an export job (`peftreg export --format gguf`), a GGUF LoRA
pulled (`peftreg pull --format gguf-lora`), a PEFT pull naming its registered base, and
`peftreg eval` on a checkpoint and a GGUF file; the GGUF files run in llama.cpp."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from peft import LoraConfig

from peftreg.adapters.base_package import push_base
from peftreg.gguf.model import export_gguf
from peftreg.gguf.runtime import GgufRun, LoraFile
from peftreg.sdk.client import Client
from peftreg.sdk.errors import PeftregError
from tests.adapters.tiny_models import tiny_gpt2
from tests.fixtures.server import RegistryProcess
from tests.gguf.models import (
    PROMPT,
    TARGETS,
    byte_level_tokenizer,
    corpus,
    tiny_llama_with_tokenizer,
)
from tests.gguf.runtime import MODULES, llamacpp
from tests.merge.builders import save_adapter, save_base


def test_gguf_export_job_lora_pull_and_eval(  # type: ignore[no-untyped-def]
    run, registry_server: RegistryProcess, tmp_path: Path
) -> None:
    client = Client(registry_server.url, cache=tmp_path / "cache")
    model = tiny_llama_with_tokenizer(tmp_path / "base")
    adapter = save_adapter(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), tmp_path / "adapter", seed=5
    )
    push_base(client, tmp_path / "base", "acme/base:v1")
    client.push(adapter, "acme/bot:v1", base=client.base_reference("acme/base:v1"))
    fingerprint = client.base_reference("acme/base:v1").fingerprint

    request = (
        "export",
        "acme/bot:v1",
        "--base",
        "acme/base:v1",
        "--merge",
        "--format",
        "gguf",
        "--quantize",
        "q4_k_m",
    )
    exported = run(*request, "--wait", "-o", str(tmp_path / "exported"))
    assert exported.exit_code == 0, exported.output
    reference = exported.stdout.strip().splitlines()[-1]
    assert [p.name for p in (tmp_path / "exported").iterdir()] == ["model-q4_k_m.gguf"]
    again = run(*request, "--json")
    assert again.exit_code == 0, again.output
    assert "existing job" in again.stderr
    assert json.loads(again.stdout)["result"]["reference"] == reference

    manifest = json.loads(client.get_manifest(reference).content)
    adapter_digest = client.resolve("acme/bot:v1")
    assert manifest["subject"]["digest"] == str(adapter_digest)
    recipe = json.loads(client.get_blob("acme/bot", manifest["config"]["digest"]))
    assert recipe["base_fingerprint"] == fingerprint
    assert recipe["quantization"]["format"] == "gguf"
    assert recipe["quantization"]["quantization"] == "q4_k_m"
    assert set(recipe["quantization"]["tensor_types"]) == {"Q4_K", "Q6_K", "F32"}
    assert "gguf" in recipe["libraries"]

    pulled_lora = run(
        "pull",
        "acme/bot:v1",
        "--format",
        "gguf-lora",
        "--base",
        "acme/base:v1",
        "-o",
        str(tmp_path / "bot.gguf"),
        "-q",
    )
    assert pulled_lora.exit_code == 0, pulled_lora.output
    pulled_peft = run("pull", "acme/bot:v1", "--format", "peft", "-o", str(tmp_path / "peft"), "-q")
    assert pulled_peft.exit_code == 0, pulled_peft.output
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert peft_config["base_model_name_or_path"] == "acme/base:v1"
    assert peft_config["peftreg_base"]["fingerprint"] == fingerprint

    merged = run(
        "merge",
        str(tmp_path / "peft"),
        "--base",
        str(tmp_path / "base"),
        "-o",
        str(tmp_path / "merged"),
        "-q",
    )
    assert merged.exit_code == 0, merged.output
    export_gguf(tmp_path / "merged", [], tmp_path / "merged.gguf", quantization="f16")
    export_gguf(tmp_path / "base", [], tmp_path / "base.gguf", quantization="f16")
    tokens = byte_level_tokenizer()(PROMPT)["input_ids"]
    tasks = [{"kind": "greedy", "tokens": tokens, "count": 6}]
    job_file, lora_on_base, merged_file = llamacpp().run_many(
        [
            GgufRun(tmp_path / "exported" / "model-q4_k_m.gguf", tasks),
            GgufRun(tmp_path / "base.gguf", tasks, [LoraFile(tmp_path / "bot.gguf")]),
            GgufRun(tmp_path / "merged.gguf", tasks),
        ]
    )
    assert len(job_file[0]["tokens"]) == 6
    assert lora_on_base[0]["tokens"] == merged_file[0]["tokens"]

    text = tmp_path / "held-out.txt"
    text.write_text(corpus()[-3000:], encoding="utf-8")
    scores = {}
    for path in (tmp_path / "merged", tmp_path / "merged.gguf"):
        result = run(
            "eval",
            str(path),
            "--text",
            str(text),
            "--window",
            "128",
            "--llamacpp-modules",
            str(MODULES),
            "--json",
        )
        assert result.exit_code == 0, result.output
        scores[path.suffix] = json.loads(result.stdout)
    assert scores[""]["runtime"] == "transformers"
    assert scores[".gguf"]["runtime"] == "llama.cpp"
    assert scores[".gguf"]["scored"] == scores[""]["scored"]
    assert scores[".gguf"]["perplexity"] == pytest.approx(scores[""]["perplexity"], rel=1e-2)


def test_gguf_export_of_an_unsupported_architecture_is_refused_at_the_request(  # type: ignore[no-untyped-def]
    run, registry_server: RegistryProcess, tmp_path: Path
) -> None:
    client = Client(registry_server.url, cache=tmp_path / "cache")
    gpt2 = tiny_gpt2()
    save_base(gpt2, tmp_path / "gpt2")
    adapter = save_adapter(gpt2, LoraConfig(r=2, target_modules=["c_attn"]), tmp_path / "lora")
    push_base(client, tmp_path / "gpt2", "acme/gpt2:v1")
    client.push(adapter, "acme/g:v1", base=client.base_reference("acme/gpt2:v1"))
    result = run("export", "acme/g:v1", "--base", "acme/gpt2:v1", "--merge", "--format", "gguf")
    assert result.exit_code == 1
    assert "GGUF export supports the architectures" in result.output
    assert "GPT2LMHeadModel" in result.output
    with pytest.raises(PeftregError, match="quantize q4_0 is a GGUF type: set format gguf"):
        client.export("acme/g:v1", "acme/gpt2:v1", quantize="q4_0")
    with pytest.raises(PeftregError, match="format gguf takes quantize"):
        client.export("acme/g:v1", "acme/gpt2:v1", quantize="int4", output_format="gguf")
    assert client.jobs() == []
