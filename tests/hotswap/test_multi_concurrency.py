"""Multi-adapter hosts under concurrency and torch.compile: loading and evicting in another
thread never blocks the batches of other slots nor gives a mixed row; an eviction waits only
for the batches that pin its slot; 20 different batch mixes (with loads between them) do not
recompile a compiled model."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from peftreg.hotswap import HostConfig, RankTooLarge
from peftreg.hotswap.multi import MultiAdapterHost
from tests.adapters.tiny_models import sample_ids, tiny_llama
from tests.hotswap.builders import lora, model_outputs, nola_adapter, prompt_tuning, save_adapter

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
CONFIG = HostConfig(targets=TARGETS, max_rank=8, max_virtual_tokens=4)
WAIT = 60.0  # a bound on waits that must succeed; never reached when the code is right
EXACT = 1e-6


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("multi-concurrency")
    return {
        "a": save_adapter(tiny_llama, lora(["q_proj", "v_proj"], r=4), root / "a", seed=1),
        "b": save_adapter(tiny_llama, lora(TARGETS, r=8, use_rslora=True), root / "b", seed=2),
        "x": save_adapter(tiny_llama, lora(["o_proj"], r=2, use_dora=True), root / "x", seed=3),
        "y": save_adapter(tiny_llama, lora(["down_proj", "q_proj"], r=8), root / "y", seed=4),
        "p": save_adapter(tiny_llama, prompt_tuning(3), root / "p", seed=5),
        "n": nola_adapter(tiny_llama, ["model.layers.1.mlp.down_proj"], root / "n")[0],
        "big": save_adapter(tiny_llama, lora(["q_proj"], r=16), root / "big", seed=6),
    }


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return (got - want).abs().max().item() <= EXACT


def test_loads_and_evictions_of_other_slots_run_while_a_batch_holds_its_slots(
    sources: dict[str, Path],
) -> None:
    model = tiny_llama()
    ids = sample_ids(length=8).repeat(2, 1)[:3]
    with MultiAdapterHost(model, CONFIG, slots=4) as host, torch.no_grad():
        host.prefetch([sources[k] for k in ("x", "y")])
        a = host.load(sources["a"], name="a")
        host.load(sources["b"], name="b")
        with host.batch(["a", "b", None]):
            want = model_outputs(model, ids)
        go, done, evicting = threading.Event(), threading.Event(), threading.Event()
        errors: list[BaseException] = []
        evicted: list[bool] = []

        def churn() -> None:  # loads and evictions of other slots, while the batch runs
            try:
                go.wait(WAIT)
                for _ in range(3):
                    for key in ("x", "y"):
                        host.load(sources[key])
                    host.load(sources["x"])
                    for key in ("x", "y"):
                        host.evict(host.load(sources[key]).digest)
                done.set()
            except BaseException as exc:
                errors.append(exc)
                done.set()

        def evict_a() -> None:
            evicting.set()
            evicted.append(host.evict("a"))

        worker = threading.Thread(target=churn)
        worker.start()
        with host.batch(["a", "b", None]) as assignment:
            go.set()
            assert done.wait(WAIT)  # never blocked by the batch in flight
            assert not errors, errors
            assert _close(model_outputs(model, ids), want)
            evictor = threading.Thread(target=evict_a)
            evictor.start()
            assert evicting.wait(WAIT)
            assert host.table.wait_for(lambda table: table.draining(a.digest), WAIT)
            assert evictor.is_alive()  # it waits for this batch, which pins the slot
            assert a.digest not in host.resident()
            host.load(sources["x"])  # the draining slot is not reused meanwhile
            host.load(sources["y"])
            assert _close(model_outputs(model, ids), want)  # row 0 still reads "a" whole
        evictor.join(WAIT)
        worker.join(WAIT)
        assert evicted == [True]
        assert assignment.slots[0] == a.slot
        with host.batch(["a", "b", None]):  # "a" comes back (from the CPU LRU)
            assert _close(model_outputs(model, ids), want)


def test_racing_evictions_never_give_a_mixed_row(sources: dict[str, Path]) -> None:
    """Two slots for three adapters: every batch loads x or y into the slot the other held,
    while a thread evicts them as fast as it can; each row is always one adapter whole."""
    model = tiny_llama()
    ids = sample_ids(length=8)
    with MultiAdapterHost(model, CONFIG, slots=2) as host, torch.no_grad():
        digests = dict(zip("xy", host.prefetch([sources["x"], sources["y"]]), strict=True))
        host.load(sources["a"], name="a")
        want = {}
        for key in "xy":
            with host.batch([sources[key], "a"]):
                want[key] = model_outputs(model, ids)
        assert not _close(want["x"][0], want["y"][0])
        stop = threading.Event()
        evictions: list[bool] = []

        def evict() -> None:
            while not stop.is_set():
                for digest in digests.values():
                    evictions.append(host.evict(digest))

        worker = threading.Thread(target=evict)
        worker.start()
        try:
            for step in range(12):
                key = "xy"[step % 2]
                with host.batch([sources[key], "a"]) as assignment:
                    got = model_outputs(model, ids)
                assert assignment.digests[0] == digests[key]
                assert _close(got, want[key]), (step, key)
        finally:
            stop.set()
            worker.join(WAIT)
        assert any(evictions)


def test_a_refused_adapter_leaves_no_slot_taken_nor_pinned(sources: dict[str, Path]) -> None:
    """A batch naming an adapter the host cannot serve (rank 16 > max_rank 8) fails before
    its forwards; what it had pinned is released and the slot it reserved is free again."""
    model = tiny_llama()
    ids = sample_ids(length=8)
    with MultiAdapterHost(model, CONFIG, slots=2) as host, torch.no_grad():
        a = host.load(sources["a"], name="a")
        with host.batch(["a", None]):
            want = model_outputs(model, ids)
        with pytest.raises(RankTooLarge, match="rank 16"), host.batch(["a", sources["big"]]):
            pytest.fail("the batch must not start")
        assert host.table.pins(a.digest) == 0
        assert host.resident() == {a.digest: a.slot}
        x = host.load(sources["x"])  # the slot the refused adapter had reserved
        assert x.slot != a.slot
        with host.batch(["a", None]):
            assert _close(model_outputs(model, ids), want)


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_twenty_batch_mixes_do_not_recompile(sources: dict[str, Path], fresh_dynamo: None) -> None:
    model = tiny_llama()
    ids = sample_ids(length=8).repeat(2, 1)
    keys = [key for key in sources if key != "big"]
    generator = random.Random(7)
    with MultiAdapterHost(model, CONFIG, slots=4) as host, torch.no_grad():
        host.prefetch([sources[key] for key in keys])
        compiled = torch.compile(model, backend="eager")
        with host.batch([None] * 4):
            compiled(input_ids=ids)  # the one compilation
        graphs = counters["stats"]["unique_graphs"]
        assert graphs == 1
        assert not counters["graph_break"]
        mixes: set[tuple[str | None, ...]] = set()
        outputs: list[torch.Tensor] = []
        with torch._dynamo.config.patch(error_on_recompile=True):
            while len(mixes) < 20:
                mix = tuple(generator.choice([*keys, None]) for _ in range(4))
                if mix in mixes or len({k for k in mix if k}) > 4:
                    continue
                mixes.add(mix)
                rows = [None if k is None else sources[k] for k in mix]
                with host.batch(rows):  # six adapters, four slots: loads between mixes
                    got = compiled(input_ids=ids).logits
                    if len(mixes) % 4 == 1:  # against the eager model, now and then
                        assert _close(got, model(input_ids=ids).logits), mix
                outputs.append(got)
        assert counters["stats"]["unique_graphs"] == graphs
        assert host.table.evictions > 0
        assert len({tuple(out[:, -1, :8].flatten().tolist()) for out in outputs}) == len(outputs)
