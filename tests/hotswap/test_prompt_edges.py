"""Soft-prompt slots at their edges: `labels=`, left padding, adapters without a prompt on a
host that reserves virtual tokens, `str` sources and refused values.

The reference is peft.PeftModel's uncached forward (and the plain model for no adapter),
in fp32, within 1e-5.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

from peftreg.hotswap import AdapterHost, HostConfig, NonFiniteAdapter, SwapError
from tests.adapters.tiny_models import sample_ids, tiny_llama
from tests.hotswap.builders import MAX_DIFF, lora, prompt_tuning, save_adapter

VIRTUAL = 8
TARGETS = ["q_proj", "v_proj"]
PAD = 3  # the second row of the batch is left-padded by this many tokens


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prompt-edges")
    return {
        "prompt_tuning": save_adapter(tiny_llama, prompt_tuning(5), root / "prompt"),
        "lora": save_adapter(tiny_llama, lora(TARGETS), root / "lora"),
    }


def batch(padded: bool) -> dict[str, torch.Tensor]:
    ids = sample_ids()
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :PAD] = 0
        ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def reference(kind: str, adapters: dict[str, Path]) -> tuple[nn.Module, int]:
    """(peft's model, or the plain one for "none"; its number of virtual tokens)."""
    if kind == "none":
        return tiny_llama().eval(), 0
    model = PeftModel.from_pretrained(tiny_llama(), str(adapters[kind])).eval()
    return model, 5 if kind == "prompt_tuning" else 0


def hosted(
    kind: str, adapters: dict[str, Path], batches: list[dict[str, torch.Tensor]]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(loss, logits of the real positions) per batch, on a host that reserves VIRTUAL slots."""
    model = tiny_llama().eval()
    outputs = []
    with AdapterHost(model, HostConfig(targets=TARGETS, max_virtual_tokens=VIRTUAL)) as host:
        if kind != "none":
            host.swap(adapters[kind])
        with torch.no_grad():
            for inputs in batches:
                out = model(**inputs)
                outputs.append((out.loss, out.logits[:, VIRTUAL:]))
    return outputs


@pytest.mark.parametrize("kind", ["prompt_tuning", "lora", "none"])
def test_loss_and_logits_equal_peft(kind: str, adapters: dict[str, Path]) -> None:
    """Unpadded and left-padded batches, with `labels=`."""
    batches = [batch(padded=False), batch(padded=True)]
    model, virtual = reference(kind, adapters)
    for inputs, (loss, logits) in zip(batches, hosted(kind, adapters, batches), strict=True):
        with torch.no_grad():
            want = model(**inputs)
        real = inputs["attention_mask"].bool()
        assert abs(loss.item() - want.loss.item()) <= MAX_DIFF
        assert (logits[real] - want.logits[:, virtual:][real]).abs().max().item() <= MAX_DIFF


def test_a_prompt_changes_the_loss(adapters: dict[str, Path]) -> None:
    """The comparison above can fail: the adapter moves the loss well beyond 1e-5."""
    inputs = [batch(padded=True)]
    ((with_prompt, _),) = hosted("prompt_tuning", adapters, inputs)
    ((without, _),) = hosted("none", adapters, inputs)
    assert abs(with_prompt.item() - without.item()) > 1e-3


def test_a_string_naming_a_directory_is_swapped_in(adapters: dict[str, Path]) -> None:
    model = tiny_llama()
    with AdapterHost(model, HostConfig(targets=TARGETS, max_virtual_tokens=VIRTUAL)) as host:
        event = host.swap(str(adapters["prompt_tuning"]))
        assert event.kind == "prompt_tuning"
        assert host.active_digest == event.digest


@pytest.mark.parametrize("source", ["./no/such/adapter-dir", "Acme/Bot:v1"])
def test_a_string_that_is_neither_says_so(source: str) -> None:
    model = tiny_llama()
    with AdapterHost(model, HostConfig(targets=TARGETS)) as host:
        with pytest.raises(SwapError, match="neither an existing local directory nor a registry"):
            host.swap(source)
        assert host.active_digest is None


def test_refused_values_name_the_adapter_and_the_module(
    adapters: dict[str, Path], tmp_path: Path
) -> None:
    broken = tmp_path / "nan-lora"
    broken.mkdir()
    for file in adapters["lora"].iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    weights = broken / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    name = next(key for key in sorted(tensors) if "v_proj.lora_B" in key)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(weights))
    model = tiny_llama()
    with AdapterHost(model, HostConfig(targets=TARGETS)) as host:
        with pytest.raises(NonFiniteAdapter) as refused:
            host.swap(broken)
        assert str(broken) in str(refused.value)
        assert "v_proj" in str(refused.value)
        assert host.active_digest is None


NEW_TOKENS = 4


@pytest.mark.parametrize("kind", ["prompt_tuning", "lora"])
def test_cached_generation_of_a_left_padded_batch_equals_peft(
    kind: str, adapters: dict[str, Path]
) -> None:
    """KV-cached greedy `generate()` on the host = peft's greedy decoding by whole-sequence
    forwards (peft's own cached generate re-prepends its virtual tokens; see test_generate)."""
    inputs = batch(padded=True)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    peft_model, _ = reference(kind, adapters)
    want, want_logits = ids, []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            grown = torch.cat([mask, torch.ones_like(want[:, mask.shape[1] :])], dim=1)
            step = peft_model(input_ids=want, attention_mask=grown).logits[:, -1]
            want_logits.append(step)
            want = torch.cat([want, step.argmax(-1, keepdim=True)], dim=1)
    model = tiny_llama().eval()
    with AdapterHost(model, HostConfig(targets=TARGETS, max_virtual_tokens=VIRTUAL)) as host:
        host.swap(adapters[kind])
        with host.pinned(), torch.no_grad():
            got = model.generate(  # type: ignore[operator]
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=0,
                return_dict_in_generate=True,
                output_logits=True,
            )
    assert torch.equal(got.sequences, want)
    difference = torch.stack(got.logits) - torch.stack(want_logits)
    assert difference.abs().max().item() <= MAX_DIFF
