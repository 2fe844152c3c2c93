"""Every kind swapped into a host gives peft.PeftModel's outputs (fp32, max abs diff <= 1e-5),
on a tiny Llama, a tiny GPT-2 (Conv1D) and a plain nn.Module MLP, unmerged and merged."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from peftreg.hotswap import AdapterHost, HostConfig
from peftreg.hotswap.config import SwapMode
from tests.adapters.tiny_models import sample_ids, tiny_gpt2, tiny_llama
from tests.hotswap.builders import (
    MAX_DIFF,
    ModelFactory,
    TinyMLP,
    lora,
    mlp_input,
    model_outputs,
    nola_adapter,
    peft_outputs,
    prompt_tuning,
    save_adapter,
)

LLAMA_TARGETS = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "embed_tokens",
]
VIRTUAL = 8
# A case builds (what the host swaps in, what peft loads, virtual tokens of the adapter).
Case = Callable[[Path], tuple[Path, Path, int]]


def _same(path: Path) -> tuple[Path, Path, int]:
    return path, path, 0


def _nola(make: ModelFactory, modules: list[str]) -> Case:
    def build(tmp: Path) -> tuple[Path, Path, int]:
        directory, as_lora = nola_adapter(make, modules, tmp / "nola")
        return directory, as_lora, 0

    return build


LLAMA_CASES: dict[str, Case] = {
    "lora": lambda tmp: _same(
        save_adapter(tiny_llama, lora(["q_proj", "v_proj", "embed_tokens"]), tmp / "a")
    ),
    "rslora": lambda tmp: _same(
        save_adapter(
            tiny_llama,
            lora(
                ["q_proj", "v_proj", "down_proj"],
                use_rslora=True,
                rank_pattern={"layers.0.self_attn.q_proj": 2, "down_proj": 8},
                alpha_pattern={"v_proj": 16},
            ),
            tmp / "a",
        )
    ),
    "dora": lambda tmp: _same(
        save_adapter(tiny_llama, lora(["q_proj", "o_proj", "gate_proj"], use_dora=True), tmp / "a")
    ),
    "lora_bias": lambda tmp: _same(
        save_adapter(tiny_llama, lora(["o_proj"], lora_bias=True), tmp / "a")
    ),
    "nola": _nola(tiny_llama, ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"]),
    "prompt_tuning": lambda tmp: (
        save_adapter(tiny_llama, prompt_tuning(5), tmp / "a"),
        tmp / "a",
        5,
    ),
}
MERGEABLE = ("lora", "rslora", "dora", "nola")  # prompt tuning has no weights to merge; peft
# cannot merge a lora_B bias into a layer without a bias either
LLAMA_RUNS = [(case, "unmerged") for case in LLAMA_CASES] + [(case, "merged") for case in MERGEABLE]


class Built:
    """Adapters and peft's outputs, built once per module and shared by both modes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cases: dict[str, tuple[Path, torch.Tensor]] = {}
        self._other: dict[str, Path] = {}

    def case(
        self, label: str, build: Case, make: ModelFactory, inputs: torch.Tensor
    ) -> tuple[Path, torch.Tensor]:
        """(what the host swaps in, peft's outputs on the real positions)."""
        if label not in self._cases:
            source, reference, tokens = build(self.root / label)
            want = peft_outputs(make, reference, inputs)[:, tokens:]
            self._cases[label] = (source, want)
        return self._cases[label]

    def other(self, label: str, make: ModelFactory, targets: list[str]) -> Path:
        """A rank-8 LoRA on every target, swapped in first so the case overwrites it."""
        if label not in self._other:
            path = self.root / f"other-{label}"
            self._other[label] = save_adapter(make, lora(targets, r=8), path, seed=11)
        return self._other[label]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return Built(tmp_path_factory.mktemp("hotswap-adapters"))


def _dir(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.mark.parametrize(("case", "mode"), LLAMA_RUNS)
def test_llama_matches_peft(case: str, mode: SwapMode, built: Built) -> None:
    ids = sample_ids()
    source, want = built.case(
        f"llama-{case}", lambda root: LLAMA_CASES[case](_dir(root)), tiny_llama, ids
    )
    other = built.other("llama", tiny_llama, LLAMA_TARGETS[:-1])
    model = tiny_llama()
    base = model_outputs(model, ids)
    config = HostConfig(targets=LLAMA_TARGETS, max_rank=8, mode=mode, max_virtual_tokens=VIRTUAL)
    with AdapterHost(model, config) as host:
        host.swap(other)
        event = host.swap(source)
        got = model_outputs(model, ids)[:, VIRTUAL:]
        assert host.active is not None
        assert event.kind == host.active.kind
        assert host.active_digest == event.digest
    assert (want - base).abs().max().item() > 1e-3  # the adapter changes the outputs
    assert (want - got).abs().max().item() <= MAX_DIFF


def test_prompt_with_attention_mask_and_a_full_slot(tmp_path: Path) -> None:
    """n == V (no masked virtual tokens) and a caller's attention mask."""
    path = save_adapter(tiny_llama, prompt_tuning(VIRTUAL), tmp_path / "p")
    ids = sample_ids()
    mask = torch.ones_like(ids)
    want = peft_outputs(tiny_llama, path, ids)[:, VIRTUAL:]
    model = tiny_llama()
    with AdapterHost(model, HostConfig(targets=["q_proj"], max_virtual_tokens=VIRTUAL)) as host:
        host.swap(path)
        got = model_outputs(model, ids, attention_mask=mask)[:, VIRTUAL:]
        assert host.virtual_tokens == VIRTUAL
    assert (want - got).abs().max().item() <= MAX_DIFF


GPT2_CASES: dict[str, Case] = {
    "lora": lambda tmp: _same(
        save_adapter(tiny_gpt2, lora(["c_attn", "c_fc"], fan_in_fan_out=True), tmp / "a")
    ),
    "dora": lambda tmp: _same(
        save_adapter(tiny_gpt2, lora(["c_attn"], fan_in_fan_out=True, use_dora=True), tmp / "a")
    ),
    "prompt_tuning": lambda tmp: (
        save_adapter(tiny_gpt2, prompt_tuning(3), tmp / "a"),
        tmp / "a",
        3,
    ),
}


@pytest.mark.parametrize("case", list(GPT2_CASES))
def test_gpt2_conv1d_and_absolute_positions_match_peft(case: str, built: Built) -> None:
    ids = sample_ids()
    source, want = built.case(
        f"gpt2-{case}", lambda root: GPT2_CASES[case](_dir(root)), tiny_gpt2, ids
    )
    model = tiny_gpt2()
    config = HostConfig(targets=["c_attn", "c_fc"], max_rank=4, max_virtual_tokens=4)
    with AdapterHost(model, config) as host:
        host.swap(source)
        got = model_outputs(model, ids)[:, 4:]
    assert (want - got).abs().max().item() <= MAX_DIFF


MLP_CASES: dict[str, Case] = {
    "lora": lambda tmp: _same(save_adapter(TinyMLP, lora(["fc1", "fc2"]), tmp / "a")),
    "rslora": lambda tmp: _same(
        save_adapter(
            TinyMLP,
            lora(["fc1", "out"], r=8, use_rslora=True, rank_pattern={"out": 2}),
            tmp / "a",
        )
    ),
    "dora": lambda tmp: _same(
        save_adapter(TinyMLP, lora(["fc2", "out"], use_dora=True), tmp / "a")
    ),
    "nola": _nola(TinyMLP, ["fc1", "fc2"]),
    "subset": lambda tmp: _same(save_adapter(TinyMLP, lora(["fc2"], r=2), tmp / "a")),
}


@pytest.mark.parametrize("mode", ["unmerged", "merged"])
@pytest.mark.parametrize("case", list(MLP_CASES))
def test_plain_module_matches_peft(case: str, mode: SwapMode, built: Built) -> None:
    x = mlp_input()
    source, want = built.case(f"mlp-{case}", lambda root: MLP_CASES[case](_dir(root)), TinyMLP, x)
    other = built.other("mlp", TinyMLP, ["fc1", "fc2", "out"])
    model = TinyMLP()
    base = model_outputs(model, x)
    with AdapterHost(model, HostConfig(targets="all-linear", max_rank=8, mode=mode)) as host:
        assert [slot.name for slot in host.sites] == ["fc1", "fc2", "out"]
        host.swap(other)
        host.swap(source)
        got = model_outputs(model, x)
        host.unload()
        assert torch.equal(model_outputs(model, x), base)
    assert (want - base).abs().max().item() > 1e-3
    assert (want - got).abs().max().item() <= MAX_DIFF
