"""Hot-swap, unmerged, of IA3, p-tuning and multitask prompt tuning against peft.

IA3 scales the outputs of its modules (biases included, Qwen2's q/k/v) and the inputs
of its feedforward modules, on Llama, Qwen2 and GPT-2 (Conv1D); the host equals peft's
`PeftModel` within 1e-5 (fp32), a LoRA swapped in after it equals peft's LoRA, and
after `unload` the model computes bitwise what it computed before. P-tuning serves the
virtual tokens peft's encoder computed at save time; a multitask prompt serves one
task per swap, equal to peft's forward with that task id for every row.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import (
    IA3Config,
    MultitaskPromptTuningConfig,
    PeftConfig,
    PeftModel,
    PromptEncoderConfig,
    get_peft_model,
)
from transformers import PreTrainedModel

from peftreg.hotswap import AdapterHost, AdapterShapeMismatch, HostConfig, UnsupportedAdapter
from peftreg.hotswap.multi import MultiAdapterHost
from tests.adapters.tiny_models import sample_ids, tiny_gpt2, tiny_llama, tiny_qwen2
from tests.hotswap.builders import MAX_DIFF, lora, save_adapter

Make = Callable[[], PreTrainedModel]
VIRTUAL = 6  # the host's soft-prompt slot: more than the adapters' 4 virtual tokens
TOKENS = 4


def trained(make: Make, config: PeftConfig, path: Path, seed: int = 7) -> Path:
    """A PEFT directory of `config` whose every trainable parameter moved (a stand-in for
    training: IA3 vectors away from ones, task factors, prompt encoders)."""
    model = get_peft_model(make(), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def logits(model: torch.nn.Module, **extra: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=sample_ids(), **extra).logits  # type: ignore[no-any-return]


def peft_logits(make: Make, path: Path, **extra: torch.Tensor) -> torch.Tensor:
    return logits(PeftModel.from_pretrained(make(), str(path)).eval(), **extra)


IA3_CASES = {
    "llama": (
        tiny_llama,
        IA3Config(
            target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
        ),
        ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
    ),
    "llama-regex": (  # peft's other form: regular expressions over the module path
        tiny_llama,
        IA3Config(target_modules=r".*\.(k_proj|up_proj)", feedforward_modules=r".*\.up_proj"),
        "all-linear",
    ),
    "qwen2-biases": (
        tiny_qwen2,
        IA3Config(
            target_modules=["q_proj", "k_proj", "v_proj", "up_proj"],
            feedforward_modules=["up_proj"],
        ),
        "all-linear",
    ),
    "gpt2-conv1d": (
        tiny_gpt2,
        IA3Config(
            target_modules=["c_attn", "mlp.c_proj"],
            feedforward_modules=["mlp.c_proj"],
            fan_in_fan_out=True,
        ),
        ["c_attn", "c_proj", "c_fc"],
    ),
}


@pytest.mark.parametrize("case", sorted(IA3_CASES))
def test_ia3_unmerged_equals_peft_and_unloads_exactly(case: str, tmp_path: Path) -> None:
    make, config, targets = IA3_CASES[case]
    ia3 = trained(make, config, tmp_path / "ia3")
    lora_targets = ["c_attn"] if case == "gpt2-conv1d" else ["q_proj", "down_proj"]
    extra = {"fan_in_fan_out": True} if case == "gpt2-conv1d" else {}
    other = save_adapter(make, lora(lora_targets, **extra), tmp_path / "lora")
    model = make()
    plain = logits(model)
    with AdapterHost(model, HostConfig(targets=targets, max_rank=4)) as host:
        assert torch.equal(logits(model), plain)  # scales of one change nothing
        event = host.swap(ia3)
        assert (event.kind, event.bytes_copied > 0) == ("ia3", True)
        got, want = logits(model), peft_logits(make, ia3)
        assert (got - plain).abs().max().item() > 1e-3  # the adapter does something
        assert (got - want).abs().max().item() <= MAX_DIFF
        host.swap(other)  # the IA3 scales go back to ones
        assert (logits(model) - peft_logits(make, other)).abs().max().item() <= MAX_DIFF
        host.swap(ia3)
        assert (logits(model) - want).abs().max().item() <= MAX_DIFF
        host.unload()
        assert torch.equal(logits(model), plain)


def test_a_host_without_ia3_scales_refuses_ia3_naming_what_serves_it(tmp_path: Path) -> None:
    make, config, targets = IA3_CASES["llama"]
    ia3 = trained(make, config, tmp_path / "ia3")
    model = make()
    lean = AdapterHost(model, HostConfig(targets=targets, ia3=False))
    with lean:
        with pytest.raises(UnsupportedAdapter, match=r"ia3=True.*mode='merged'"):
            lean.swap(ia3)
        assert lean.active is None
        lean_bytes = lean.nbytes
    with AdapterHost(model, HostConfig(targets=targets)) as host:
        assert host.nbytes > lean_bytes  # the reserved scales
    with AdapterHost(model, HostConfig(targets=["q_proj"])) as narrow:
        with pytest.raises(AdapterShapeMismatch, match=r"(v_proj|down_proj), which has no slot"):
            narrow.swap(ia3)
        assert narrow.active is None
    with AdapterHost(model, HostConfig(targets=targets, mode="merged")) as merged:
        merged.swap(ia3)
        assert (logits(model) - peft_logits(make, ia3)).abs().max().item() <= MAX_DIFF


@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
def test_p_tuning_serves_the_prompt_its_encoder_computed(encoder: str, tmp_path: Path) -> None:
    config = PromptEncoderConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=TOKENS,
        encoder_hidden_size=16,
        encoder_reparameterization_type=encoder,
    )
    path = trained(tiny_llama, config, tmp_path / "p")
    model = tiny_llama()
    with AdapterHost(model, HostConfig(targets=["q_proj"], max_virtual_tokens=VIRTUAL)) as host:
        assert host.swap(path).kind == "p_tuning"
        got = logits(model)[:, VIRTUAL:]
        want = peft_logits(tiny_llama, path)[:, TOKENS:]
        assert (got - want).abs().max().item() <= MAX_DIFF


@pytest.fixture(scope="module")
def multitask(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = MultitaskPromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=TOKENS, num_tasks=3, num_ranks=2
    )
    return trained(tiny_llama, config, tmp_path_factory.mktemp("mpt") / "mpt")


def test_a_multitask_prompt_serves_the_task_of_each_swap(multitask: Path) -> None:
    model = tiny_llama()
    reference = PeftModel.from_pretrained(tiny_llama(), str(multitask)).eval()
    with AdapterHost(model, HostConfig(targets=["q_proj"], max_virtual_tokens=VIRTUAL)) as host:
        outputs = []
        for task in (2, 0, 1):
            event = host.swap(multitask, task_id=task)
            assert (event.task_id, host.active_task, event.bytes_copied > 0) == (task, task, True)
            got = logits(model)[:, VIRTUAL:]
            want = logits(reference, task_ids=torch.tensor([task, task]))[:, TOKENS:]
            assert (got - want).abs().max().item() <= MAX_DIFF, task
            outputs.append(got)
        assert (outputs[0] - outputs[1]).abs().max().item() > 1e-3  # tasks differ
        assert host.swap(multitask, task_id=1).bytes_copied == 0  # already active
        host.unload()
        assert host.active_task is None


def test_task_ids_are_checked_before_anything_changes(multitask: Path, tmp_path: Path) -> None:
    other = save_adapter(tiny_llama, lora(["q_proj"]), tmp_path / "lora")
    model = tiny_llama()
    with AdapterHost(model, HostConfig(targets=["q_proj"], max_virtual_tokens=VIRTUAL)) as host:
        host.swap(multitask, task_id=1)
        before = logits(model)
        with pytest.raises(UnsupportedAdapter, match=r"of 3 tasks; swap it with task_id="):
            host.swap(multitask)
        with pytest.raises(UnsupportedAdapter, match="task_id 3 is not one of its 3 tasks"):
            host.swap(multitask, task_id=3)
        with pytest.raises(UnsupportedAdapter, match="lora adapter, which has no tasks"):
            host.swap(other, task_id=0)
        assert (host.active_task, torch.equal(logits(model), before)) == (1, True)


def test_multi_adapter_rows_serve_p_tuning_and_ia3(multitask: Path, tmp_path: Path) -> None:
    """One slot, reused: each adapter's row equals peft's, the base row the plain model's
    (an IA3 slot reused by a LoRA gets its scales back to ones)."""
    config = PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=TOKENS, encoder_hidden_size=16
    )
    make, ia3_config, targets = IA3_CASES["llama"]
    adapters = {
        "p_tuning": trained(make, config, tmp_path / "p"),
        "ia3": trained(make, ia3_config, tmp_path / "ia3"),
        "lora": save_adapter(make, lora(["q_proj", "down_proj"]), tmp_path / "lora"),
    }
    model = make()
    plain = logits(make())
    host_config = HostConfig(targets=targets, max_rank=4, max_virtual_tokens=VIRTUAL)
    with MultiAdapterHost(model, host_config, slots=1) as host:
        for kind in ("p_tuning", "ia3", "lora", "ia3"):
            with host.batch([None, adapters[kind]]):
                got = logits(model)[:, VIRTUAL:]
            want = peft_logits(make, adapters[kind])[:, TOKENS if kind == "p_tuning" else 0 :]
            assert (got[1] - want[1]).abs().max().item() <= MAX_DIFF, kind
            assert (got[0] - plain[0]).abs().max().item() <= MAX_DIFF, kind
        with pytest.raises(UnsupportedAdapter, match="task_id="):
            host.load(multitask)
