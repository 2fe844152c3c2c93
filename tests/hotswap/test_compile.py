"""A torch.compile'd model does not recompile across swaps of any kind, IA3 and p-tuning
included, nor when a swap serves an adapter's own tensors in place (a resident set)
(dynamo's counters, and `error_on_recompile`), with dynamo alone (eager) and with
AOTAutograd's graphs (aot_eager)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from peft import IA3Config, PromptEncoderConfig
from torch._dynamo.utils import counters

from peftreg.hotswap import AdapterHost, HostConfig
from tests.adapters.tiny_models import sample_ids, tiny_llama
from tests.hotswap.builders import lora, nola_adapter, prompt_tuning, save_adapter

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """One adapter of every kind (built once for both backends)."""
    root = tmp_path_factory.mktemp("compile-adapters")
    return [
        save_adapter(tiny_llama, lora(["q_proj", "v_proj"], r=4), root / "lora4"),
        save_adapter(tiny_llama, lora(TARGETS, r=8, use_rslora=True), root / "rslora8"),
        save_adapter(tiny_llama, lora(["o_proj"], r=2, use_dora=True), root / "dora2"),
        nola_adapter(tiny_llama, ["model.layers.1.mlp.down_proj"], root / "nola")[0],
        save_adapter(tiny_llama, prompt_tuning(3), root / "prompt"),
        save_adapter(
            tiny_llama,
            IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]),
            root / "ia3",
        ),
        save_adapter(
            tiny_llama,
            PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=8),
            root / "p-tuning",
        ),
    ]


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_swaps_do_not_recompile(backend: str, sources: list[Path], fresh_dynamo: None) -> None:
    model = tiny_llama()
    ids = sample_ids()
    config = HostConfig(targets=TARGETS, max_rank=8, max_virtual_tokens=4)
    with AdapterHost(model, config) as host, torch.no_grad():
        loaded = [host.load(path) for path in sources]
        compiled = torch.compile(model, backend=backend)
        compiled(input_ids=ids)  # the one compilation
        graphs = counters["stats"]["unique_graphs"]
        assert graphs == 1  # the model's forward, hooks inlined; the gate runs eagerly
        assert not counters["graph_break"]
        seen = []
        with torch._dynamo.config.patch(error_on_recompile=True):
            for adapter in [*loaded, None, loaded[0], loaded[2]]:
                if adapter is None:
                    host.unload()
                else:
                    host.swap(adapter)
                if adapter is loaded[1]:  # rank 8 = max_rank: the adapter's own tensors
                    assert all(slot.active.resident for slot in host.slots.values())
                got = compiled(input_ids=ids).logits
                want = model(input_ids=ids).logits  # the same host, eager
                assert torch.allclose(got, want, atol=1e-6, rtol=0)
                seen.append(got)
        assert counters["stats"]["unique_graphs"] == graphs  # (and error_on_recompile held)
        # Every swap changed what the compiled model computes.
        assert all(not torch.equal(a, b) for a, b in itertools.pairwise(seen))
