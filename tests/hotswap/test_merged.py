"""Merged mode: after any number of swaps, unload restores the base weights bitwise."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest
import torch

from peftreg.hotswap import AdapterHost, HostConfig, NonFiniteAdapter
from tests.adapters.tiny_models import sample_ids, tiny_llama
from tests.hotswap.builders import lora, model_outputs, rewrite_tensors, save_adapter

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_hundred_random_swaps_then_unload_restore_weights_bitwise(tmp_path: Path) -> None:
    adapters = [
        save_adapter(tiny_llama, lora(ALL, r=rank), tmp_path / f"r{rank}", seed=rank)
        for rank in (4, 8, 16)
    ]
    adapters.append(
        save_adapter(tiny_llama, lora(["q_proj", "o_proj"], r=8, use_dora=True), tmp_path / "dora")
    )
    adapters.append(save_adapter(tiny_llama, lora(["v_proj"], r=4), tmp_path / "subset"))
    model = tiny_llama()
    original = _snapshot(model)
    ids = sample_ids()
    base_logits = model_outputs(model, ids)
    chooser = random.Random(0)
    with AdapterHost(model, HostConfig(targets="all-linear", max_rank=16, mode="merged")) as host:
        loaded = [host.load(path) for path in adapters]
        first_logits = None
        for _ in range(100):
            choice = chooser.randrange(len(loaded))
            host.swap(loaded[choice])
            if choice == 0:
                logits = model_outputs(model, ids)
                first_logits = logits if first_logits is None else first_logits
                assert torch.equal(logits, first_logits)  # a merge is reproducible bitwise
        assert host.active_digest is not None
        assert not all(torch.equal(original[k], v) for k, v in model.state_dict().items())
        host.unload()
        assert host.active_digest is None
        after = model.state_dict()
        assert after.keys() == original.keys()
        changed = [
            name for name, tensor in original.items() if not torch.equal(tensor, after[name])
        ]
        assert changed == []
        assert torch.equal(model_outputs(model, ids), base_logits)


def test_a_merge_that_overflows_is_refused_before_the_flip(tmp_path: Path) -> None:
    """Finite factors whose product overflows fp32: the merged weights are computed and
    checked before the forward gate is taken, so a request holding the gate (pinned) does not
    delay the refusal, and nothing live is touched."""
    good = save_adapter(tiny_llama, lora(["q_proj", "v_proj"], r=4), tmp_path / "good")

    def explode(tensors: dict[str, torch.Tensor]) -> None:
        for name in sorted(tensors):
            if "layers.1.self_attn.v_proj" in name:
                tensors[name] = torch.full_like(tensors[name], 1e30)

    bad = rewrite_tensors(good, tmp_path / "bad", explode)
    model = tiny_llama()
    ids = sample_ids()
    with AdapterHost(model, HostConfig(targets="all-linear", mode="merged")) as host:
        host.swap(good)
        weights = _snapshot(model)
        logits = model_outputs(model, ids)
        entered, release = threading.Event(), threading.Event()

        def request() -> None:
            with host.pinned():
                entered.set()
                assert release.wait(30)

        worker = threading.Thread(target=request)
        worker.start()
        try:
            assert entered.wait(30)
            with pytest.raises(NonFiniteAdapter, match=r"layers\.1\.self_attn\.v_proj"):
                host.swap(bad, flip_timeout=0.5)  # a check under the gate would time out
        finally:
            release.set()
            worker.join(30)
        assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
        assert torch.equal(model_outputs(model, ids), logits)
        assert host.active is not None
        assert host.active.source == str(good)
