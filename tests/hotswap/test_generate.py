"""KV-cached `generate()` on a host with a soft-prompt slot: greedy decoding gives
peft.PeftModel's tokens (and logits within 1e-5) for prompt tuning, and for a LoRA on a host
that reserves virtual tokens it does not use.

The reference is peft's greedy decoding by whole-sequence forwards, without a KV cache:
peft 0.21's own cached `generate()` prepends the virtual tokens again at every step when
transformers (5.25 and later) passes the cache as `cache=`."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftConfig, PeftModel
from transformers import LlamaForCausalLM, PreTrainedModel

from peftreg.hotswap import AdapterHost, HostConfig
from tests.adapters.tiny_models import sample_ids, tiny_gpt2, tiny_llama
from tests.hotswap.builders import MAX_DIFF, lora, prompt_tuning, save_adapter

NEW_TOKENS = 5
CASES: dict[str, tuple[Callable[[], PreTrainedModel], Callable[[], PeftConfig], list[str]]] = {
    "llama-prompt_tuning": (tiny_llama, lambda: prompt_tuning(5), ["q_proj", "v_proj"]),
    "llama-lora": (tiny_llama, lambda: lora(["q_proj", "v_proj"]), ["q_proj", "v_proj"]),
    "gpt2-prompt_tuning": (tiny_gpt2, lambda: prompt_tuning(3), ["c_attn"]),
}


def _generate(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequences, the logits of every generated step), greedy."""
    with torch.no_grad():
        out = model.generate(  # type: ignore[operator]
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=0,
        )
    return out.sequences, torch.stack(out.logits)


def _greedy_without_cache(
    model: torch.nn.Module, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequences, the logits of every generated step), greedy, one whole forward per token."""
    sequences, logits = ids, []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            step = model(input_ids=sequences, attention_mask=torch.ones_like(sequences))
            last = step.logits[:, -1]
            logits.append(last)
            sequences = torch.cat([sequences, last.argmax(-1, keepdim=True)], dim=1)
    return sequences, torch.stack(logits)


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_generate_matches_peft(case: str, tmp_path: Path) -> None:
    make, config, targets = CASES[case]
    path = save_adapter(make, config(), tmp_path / "a")
    ids = sample_ids()
    reference = PeftModel.from_pretrained(make(), str(path)).eval()
    want_ids, want_logits = _greedy_without_cache(reference, ids)
    base_ids, _ = _generate(make(), ids)
    model = make()
    with AdapterHost(model, HostConfig(targets=targets, max_virtual_tokens=8)) as host:
        host.swap(path)
        with host.pinned():
            got_ids, got_logits = _generate(model, ids)
    assert got_ids.shape == (2, ids.shape[1] + NEW_TOKENS)
    assert torch.equal(got_ids, want_ids)
    assert not torch.equal(want_ids, base_ids)  # the adapter changes what is generated
    assert (got_logits - want_logits).abs().max().item() <= MAX_DIFF


# The KV cache's argument names the installed transformers takes: `past_key_values`
# always, and `cache` from 5.25 on.
CACHE_ARGUMENTS = [
    name
    for name in ("past_key_values", "cache")
    if name == "past_key_values" or name in inspect.signature(LlamaForCausalLM.forward).parameters
]


@pytest.mark.parametrize("cache_argument", CACHE_ARGUMENTS)
def test_cached_steps_equal_whole_sequence_forwards(tmp_path: Path, cache_argument: str) -> None:
    """Step by step with a DynamicCache (the caller's own loop) = one whole-sequence forward,
    with the cache passed under either name transformers has used (`cache=` from 5.25)."""
    from transformers import DynamicCache

    path = save_adapter(tiny_llama, prompt_tuning(3), tmp_path / "p")
    ids = sample_ids()
    model = tiny_llama()
    with AdapterHost(model, HostConfig(targets=["q_proj"], max_virtual_tokens=6)) as host:
        host.swap(path)
        with torch.no_grad():
            whole = model(input_ids=ids).logits[:, 6:]
            cache = DynamicCache(config=model.config)
            first = model(input_ids=ids[:, :8], use_cache=True, **{cache_argument: cache}).logits
            steps = [first[:, 6:]]
            for index in range(8, ids.shape[1]):
                out = model(input_ids=ids[:, index : index + 1], **{cache_argument: cache})
                steps.append(out.logits)
    assert cache.get_seq_length() == 6 + ids.shape[1]
    assert (torch.cat(steps, dim=1) - whole).abs().max().item() <= MAX_DIFF
