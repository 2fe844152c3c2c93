"""Swaps are all-or-nothing: a bad adapter fails and changes nothing; concurrent forwards
see the old adapter or the new one, never a mix."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from peftreg.hotswap import (
    AdapterDigestMismatch,
    AdapterHost,
    AdapterShapeMismatch,
    BaseMismatch,
    FlipTimeout,
    HostConfig,
    NonFiniteAdapter,
    RankTooLarge,
    SwapError,
    SwapFailure,
    TooManyVirtualTokens,
    UnsupportedAdapter,
    adapter_from_directory,
    module_fingerprint,
)
from peftreg.hotswap.host import AdapterSource
from tests.adapters.tiny_models import sample_ids, tiny_llama
from tests.hotswap.builders import (
    lora,
    model_outputs,
    nola_adapter,
    prompt_tuning,
    record_nola_digest,
    rewrite_config,
    rewrite_tensors,
    save_adapter,
)

TARGETS = ["q_proj", "v_proj", "o_proj"]
Q0_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_adapter(
        tiny_llama, lora(TARGETS, r=4), tmp_path_factory.mktemp("good") / "a", seed=1
    )


def _nan(tensors: dict[str, torch.Tensor]) -> None:
    tensors[Q0_B][3, 1] = float("nan")


def _wrong_shape(tensors: dict[str, torch.Tensor]) -> None:
    tensors[Q0_B] = torch.randn(33, 4)  # q_proj has 32 outputs


def _corrupt_nola(tmp: Path) -> Path:
    directory, _ = nola_adapter(tiny_llama, ["model.layers.0.self_attn.q_proj"], tmp / "nola")
    record_nola_digest(directory)

    def tamper(tensors: dict[str, torch.Tensor]) -> None:
        name = "base_model.model.model.layers.0.self_attn.q_proj.nola_B.coefficients"
        tensors[name][2] += 1e-3

    return rewrite_tensors(directory, tmp / "tampered", tamper)


CORRUPT: dict[str, tuple[Callable[[Path, Path], AdapterSource], type[SwapError], str]] = {
    "nan": (
        lambda good, tmp: rewrite_tensors(good, tmp / "nan", _nan),
        NonFiniteAdapter,
        "NaN or infinite",
    ),
    "wrong_shape": (
        lambda good, tmp: rewrite_tensors(good, tmp / "shape", _wrong_shape),
        AdapterShapeMismatch,
        r"shape \[33, 32\]",
    ),
    "rank_too_large": (
        lambda good, tmp: save_adapter(tiny_llama, lora(["q_proj"], r=16), tmp / "r16"),
        RankTooLarge,
        "rank 16 is above the host's max_rank 8",
    ),
    "untargeted_module": (
        lambda good, tmp: save_adapter(tiny_llama, lora(["k_proj"], r=4), tmp / "k"),
        AdapterShapeMismatch,
        "k_proj, which has no slot",
    ),
    "nola_digest_mismatch": (
        lambda good, tmp: _corrupt_nola(tmp),
        AdapterDigestMismatch,
        "materialize to",
    ),
    "base_fingerprint_mismatch": (
        lambda good, tmp: adapter_from_directory(good, base_fingerprint="sha256:" + "0" * 64),
        BaseMismatch,
        "was made for the base sha256:0000",
    ),
    "too_many_virtual_tokens": (
        lambda good, tmp: save_adapter(tiny_llama, prompt_tuning(6), tmp / "p6"),
        TooManyVirtualTokens,
        "6 virtual tokens",
    ),
    "prefix_tuning": (
        lambda good, tmp: _prefix(tmp),
        UnsupportedAdapter,
        "prefix_tuning adapter cannot be hot-swapped",
    ),
    "unused_tensor": (  # e.g. bias="all": a base bias the host would silently not apply
        lambda good, tmp: rewrite_tensors(good, tmp / "extra", _extra_bias),
        UnsupportedAdapter,
        r"does not use: base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.bias",
    ),
    "unknown_peft_feature": (
        lambda good, tmp: rewrite_config(good, tmp / "feature", _trainable_tokens),
        UnsupportedAdapter,
        r"trainable_token_indices=\[1, 2\] is a PEFT feature",
    ),
}


def _extra_bias(tensors: dict[str, torch.Tensor]) -> None:
    tensors["base_model.model.model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)


def _trainable_tokens(config: dict[str, object]) -> None:
    config["trainable_token_indices"] = [1, 2]


def _prefix(tmp: Path) -> Path:
    from peft import PrefixTuningConfig

    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    return save_adapter(tiny_llama, config, tmp / "prefix")


@pytest.mark.parametrize("mode", ["unmerged", "merged"])
@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_adapter_fails_and_changes_nothing(
    case: str, mode: str, good: Path, tmp_path: Path
) -> None:
    make, error, message = CORRUPT[case]
    bad = make(good, tmp_path)
    model = tiny_llama()
    ids = sample_ids()
    config = HostConfig(
        targets=TARGETS,
        max_rank=8,
        mode=mode,  # type: ignore[arg-type]
        max_virtual_tokens=4,
        verify_base="fingerprint",
    )
    failures: list[SwapFailure] = []
    with AdapterHost(model, config) as host:
        host.subscribe(on_error=failures.append)
        host.swap(good)
        active = host.active_digest
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        before = model_outputs(model, ids)
        with pytest.raises(error, match=message):
            host.swap(bad)
        assert host.active_digest == active
        assert torch.equal(model_outputs(model, ids), before)
        assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
        assert len(failures) == 1
        assert isinstance(failures[0].error, error)
        assert failures[0].active == active
        assert host.cache.digests() == [active]  # a refused adapter never enters the LRU
        # The host still swaps afterwards.
        host.unload()
        host.swap(good)
        assert torch.equal(model_outputs(model, ids), before)


Q0_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def _huge_b(tensors: dict[str, torch.Tensor]) -> None:
    tensors[Q0_B][0, 0] = 1e5  # finite in fp32, infinite in fp16


def _huge_product(tensors: dict[str, torch.Tensor]) -> None:
    tensors[Q0_A].fill_(300.0)  # each value fits fp16, the delta (2 * 4 * 300 * 300) does not
    tensors[Q0_B].fill_(300.0)


OVERFLOW = {"value": _huge_b, "delta": _huge_product}


@pytest.mark.parametrize("mode", ["unmerged", "merged"])
@pytest.mark.parametrize("case", list(OVERFLOW))
def test_values_that_overflow_an_fp16_host_fail_and_change_nothing(
    case: str, mode: str, good: Path, tmp_path: Path
) -> None:
    bad = rewrite_tensors(good, tmp_path / "bad", OVERFLOW[case])
    model = tiny_llama().to(torch.float16)
    ids = sample_ids()
    config = HostConfig(targets=TARGETS, max_rank=8, mode=mode)  # type: ignore[arg-type]
    with AdapterHost(model, config) as host:
        host.swap(good)
        before = model_outputs(model, ids)
        assert bool(torch.isfinite(before).all())
        with pytest.raises(NonFiniteAdapter, match=r"layers\.0\.self_attn\.q_proj.*float16"):
            host.swap(bad)
        assert torch.equal(model_outputs(model, ids), before)
        assert host.active is not None
        assert host.active.source == str(good)


def test_pinned_request_keeps_its_adapter_and_a_flip_can_time_out(
    good: Path, tmp_path: Path
) -> None:
    other = save_adapter(tiny_llama, lora(TARGETS, r=2), tmp_path / "other", seed=5)
    model = tiny_llama()
    ids = sample_ids()
    with AdapterHost(model, HostConfig(targets=TARGETS, max_rank=8)) as host:
        host.swap(good)
        before = model_outputs(model, ids)
        entered, release = threading.Event(), threading.Event()
        seen: list[object] = []

        def request() -> None:
            with host.pinned() as digest:
                seen.append(digest)
                entered.set()
                assert release.wait(30)
                seen.append(model_outputs(model, ids))  # a later step of the same request

        worker = threading.Thread(target=request)
        worker.start()
        try:
            assert entered.wait(30)
            with pytest.raises(FlipTimeout, match="still ran"):
                host.swap(other, flip_timeout=0.05)
            assert host.active_digest == seen[0]
            # The abandoned flip holds nobody back: a forward of this thread runs.
            assert torch.equal(model_outputs(model, ids), before)
        finally:
            release.set()
            worker.join(30)
        assert torch.equal(seen[1], before)  # type: ignore[arg-type]
        event = host.swap(other)  # the timed-out attempt staged it: only the flip was left
        assert event.bytes_copied == 0
        assert not torch.equal(model_outputs(model, ids), before)


def test_matching_base_fingerprint_and_structure_are_accepted(good: Path) -> None:
    model = tiny_llama()
    identity = module_fingerprint(model)
    matching = adapter_from_directory(
        good, base_fingerprint=identity.fingerprint, base_structure_hash=identity.structure_hash
    )
    config = HostConfig(targets=TARGETS, verify_base="fingerprint")
    with AdapterHost(model, config) as host:
        assert host.base_fingerprint == identity.fingerprint
        assert host.swap(matching).digest == matching.digest
    other = module_fingerprint(tiny_llama(seed=1))
    assert other.fingerprint != identity.fingerprint
    assert other.structure_hash == identity.structure_hash  # same shapes, other weights
    moved = adapter_from_directory(good, base_structure_hash=identity.structure_hash)
    with AdapterHost(tiny_llama(seed=1), HostConfig(targets=TARGETS)) as host:
        host.swap(moved)  # structure check only: accepted
    half = tiny_llama().to(torch.bfloat16)
    with (
        AdapterHost(half, HostConfig(targets=TARGETS)) as host,
        pytest.raises(BaseMismatch, match="verify_base='shapes'"),
    ):
        host.swap(moved)
    with AdapterHost(
        tiny_llama().to(torch.bfloat16), HostConfig(targets=TARGETS, verify_base="shapes")
    ) as host:
        host.swap(moved)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Bitwise-reproducible CPU kernels while two threads run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("mode", "swaps"), [("unmerged", 200), ("merged", 30)])
def test_concurrent_forwards_see_one_adapter_or_the_other(
    mode: str, swaps: int, tmp_path: Path, one_thread: None
) -> None:
    paths = [
        save_adapter(tiny_llama, lora(TARGETS, r=r), tmp_path / f"a{i}", seed=10 + i)
        for i, r in enumerate((4, 8, 2))
    ]
    model = tiny_llama()
    ids = sample_ids()
    config = HostConfig(targets=TARGETS, max_rank=8, mode=mode)  # type: ignore[arg-type]
    with AdapterHost(model, config) as host:
        adapters = [host.load(path) for path in paths]
        expected = {}
        for adapter in adapters:
            host.swap(adapter)
            expected[adapter.digest] = model_outputs(model, ids)
        assert len({tuple(t.flatten().tolist()[:8]) for t in expected.values()}) == 3
        # Each forward records the number of swaps finished when it started. The
        # main thread waits, after swap i, for a forward that started after it;
        # that forward ran wholly between swap i and swap i + 1 (the main thread
        # was waiting), so it must see adapter i: liveness without timing luck.
        results: list[tuple[int, torch.Tensor]] = []
        finished = [0]
        stop = threading.Event()
        ran = threading.Condition()
        errors: list[BaseException] = []

        def forwards() -> None:
            try:
                while not stop.is_set():
                    with ran:
                        started_after = finished[0]
                    output = model_outputs(model, ids)
                    with ran:
                        results.append((started_after, output))
                        ran.notify_all()
            except BaseException as exc:
                with ran:
                    errors.append(exc)
                    ran.notify_all()

        def first_forward_after(count: int) -> torch.Tensor | None:
            return next((out for after, out in reversed(results) if after == count), None)

        worker = threading.Thread(target=forwards)
        worker.start()
        between: list[torch.Tensor] = []
        try:
            for index in range(swaps):  # cycling through three adapters: every swap stages
                host.swap(adapters[index % 3])
                with ran:
                    finished[0] = index + 1
                    assert ran.wait_for(
                        lambda i=index: first_forward_after(i + 1) is not None or bool(errors),
                        timeout=120,
                    )
                    found = first_forward_after(index + 1)
                    assert found is not None
                    between.append(found)
        finally:
            stop.set()
            worker.join(timeout=60)
        assert not errors
        for index, output in enumerate(between):
            assert torch.equal(output, expected[adapters[index % 3].digest])
        matched = [
            next((d for d, want in expected.items() if torch.equal(got, want)), None)
            for _, got in results
        ]
        assert None not in matched, "a forward saw a mix of two adapters"
        assert len(set(matched)) == 3
