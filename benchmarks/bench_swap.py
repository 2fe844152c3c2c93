"""Swap latency of a rank-16 LoRA on every linear layer of a ~0.5B random Llama.

Compares, on the same PEFT directories and the same model (fp32, on the CPU
unless --device says otherwise), like with like:

- WARM (the adapter already in memory): peftreg `AdapterHost.swap` with the
  adapters in the host's LRU, cycling through three, against peft's
  `hotswap_adapter_from_state_dict` with state dicts loaded beforehand. The
  adapters are of the host's max rank in its dtype, so the host serves each
  from its own tensors (`peftreg.hotswap.resident`): a warm swap copies no
  bytes, it flips the slots' tensor references under the forward gate,
  where peft copies every factor into its layers' parameters;
- COLD (the adapter read from disk): peftreg `AdapterHost.swap(path)` with
  the LRU emptied first (read, parse, check, flip; again cycling three),
  against `peft.utils.hotswap.hotswap_adapter` from the
  directory;
- peft's `load_adapter` + `set_adapter` (the previous adapter deleted
  outside the timing), for reference;
- peftreg toggling between two adapters, for reference only (with adapters
  served in place, the same flip as a warm swap).

Prints medians, the two like-for-like ratios against their targets (warm
<= 0.1x, cold <= 0.3x of peft's median in the same run), and the bytes a swap copies
against the adapter's size and the measured copy bandwidth (the floor a
swap that copies its bytes would not beat; a swap served in place copies
none). Checks once that peftreg and peft compute the same logits with the
same adapter.

Run: `.venv/bin/python benchmarks/bench_swap.py [--swaps 20] [--device cpu]`.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.hotswap import hotswap_adapter, hotswap_adapter_from_state_dict
from peft.utils.save_and_load import _insert_adapter_name_into_state_dict, load_peft_weights
from transformers import LlamaConfig, LlamaForCausalLM

from peftreg.hotswap import AdapterHost, HostConfig, SwapEvent

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 16
MiB = 1024 * 1024
WARM_OURS = "WARM peftreg swap (LRU hit: served in place, flip)"
WARM_PEFT = "WARM peft hotswap_adapter_from_state_dict (preloaded)"
COLD_OURS = "COLD peftreg swap from disk (LRU emptied)"
COLD_PEFT = "COLD peft hotswap_adapter (from disk)"
LOAD_PEFT = "peft load_adapter + set_adapter"
TOGGLE_OURS = "(reference) peftreg A<->B toggle: flip only"
WARM_TARGET = 0.1  # peftreg's median over peft's, same run
COLD_TARGET = 0.3


def make_model(device: str) -> LlamaForCausalLM:
    """Hidden 1024, intermediate 4096, 24 layers, 16 heads, vocab 32000: 0.47B, fp32."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(device).eval()


def save_adapters(model: LlamaForCausalLM, root: Path, count: int) -> list[Path]:
    """`count` rank-16 LoRAs on every linear layer, random non-zero, as PEFT directories."""
    config = LoraConfig(r=RANK, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    paths = []
    for index in range(count):
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    noise = torch.randn(param.shape, generator=generator) * 0.01
                    param.copy_(noise.to(param.device))
        path = root / f"adapter-{index}"
        peft_model.save_pretrained(str(path), safe_serialization=True)
        paths.append(path)
    peft_model.unload()  # the plain model back, LoRA layers removed
    return paths


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(action: Callable[[], object], device: str) -> float:
    synchronize(device)
    started = time.perf_counter()
    action()
    synchronize(device)
    return time.perf_counter() - started


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a large on-device copy (the memory-bandwidth yardstick)."""
    source = torch.empty(64 * MiB, dtype=torch.float32, device=device).uniform_()
    target = torch.empty_like(source)
    target.copy_(source)
    seconds = min(timed(partial(target.copy_, source), device) for _ in range(5))
    return 2 * source.numel() * source.element_size() / seconds  # read + write


def adapter_bytes(path: Path) -> int:
    return (path / "adapter_model.safetensors").stat().st_size


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits  # type: ignore[no-any-return]


def median_ms(samples: list[float]) -> tuple[float, float]:
    """(median, best) in milliseconds."""
    return statistics.median(samples) * 1000, min(samples) * 1000


def next_of_three(active: int, previous: int) -> int:
    """The adapter that is neither active nor in the spare buffers (the previous one)."""
    return 3 - active - previous


def bench_peftreg(
    model: LlamaForCausalLM, paths: list[Path], ids: torch.Tensor, swaps: int, device: str
) -> tuple[dict[str, tuple[float, float]], dict[str, int], int, torch.Tensor]:
    """Timings, median bytes copied (warm, cold), host buffer bytes, logits with adapter 0."""
    results: dict[str, tuple[float, float]] = {}
    host = AdapterHost(model, HostConfig(targets=TARGETS, max_rank=RANK, cache_entries=4))
    loaded = [host.load(path) for path in paths]  # into the LRU
    host.swap(loaded[0])
    adapter_logits = logits(model, ids)
    active, previous = 0, 0
    for index in (1, 2):  # warm-up
        host.swap(loaded[index])
        active, previous = index, active
    events: list[SwapEvent] = []
    unsubscribe = host.subscribe(on_swap=events.append)
    warm = []
    for _ in range(swaps):
        index = next_of_three(active, previous)
        warm.append(timed(partial(host.swap, loaded[index]), device))
        active, previous = index, active
    unsubscribe()
    warm_copied = [event.bytes_copied for event in events]
    assert all(event.cached for event in events), "warm swaps must be LRU hits"
    results[WARM_OURS] = median_ms(warm)
    cold, cold_copied = [], []
    for _ in range(max(3, swaps // 2)):
        index = next_of_three(active, previous)
        host.cache.clear()
        started = time.perf_counter()
        event = host.swap(paths[index])
        synchronize(device)
        cold.append(time.perf_counter() - started)
        assert not event.cached, "a cold swap must read the adapter"
        cold_copied.append(event.bytes_copied)
        active, previous = index, active
    results[COLD_OURS] = median_ms(cold)
    toggle = []
    for _ in range(swaps):
        toggle.append(timed(partial(host.swap, loaded[previous]), device))
        active, previous = previous, active
    results[TOGGLE_OURS] = median_ms(toggle)
    host_bytes = host.nbytes
    host.detach()
    copied = {
        "warm": int(statistics.median(warm_copied)),
        "cold": int(statistics.median(cold_copied)),
    }
    return results, copied, host_bytes, adapter_logits


def bench_peft(
    model: LlamaForCausalLM, paths: list[Path], ids: torch.Tensor, swaps: int, device: str
) -> tuple[dict[str, tuple[float, float]], torch.Tensor]:
    """peft's hotswap from preloaded state dicts and from disk, and load_adapter +
    set_adapter; logits with adapter 0."""
    results: dict[str, tuple[float, float]] = {}
    peft_model = PeftModel.from_pretrained(model, str(paths[0])).eval()
    adapter_logits = logits(peft_model, ids)
    preloaded = [
        (
            LoraConfig.from_pretrained(str(path)),
            _insert_adapter_name_into_state_dict(
                load_peft_weights(str(path), device=device),
                adapter_name="default",
                parameter_prefix="lora_",
            ),
        )
        for path in paths
    ]
    warm = []
    for index in range(swaps + 1):
        config, state = preloaded[(index + 1) % 3]
        swap = partial(hotswap_adapter_from_state_dict, peft_model, state, "default", config)
        seconds = timed(swap, device)
        if index:  # the first one warms up
            warm.append(seconds)
    results[WARM_PEFT] = median_ms(warm)
    cold = []
    for index in range(swaps + 1):
        path = str(paths[index % 3])
        swap = partial(hotswap_adapter, peft_model, path, "default", torch_device=device)
        seconds = timed(swap, device)
        if index:
            cold.append(seconds)
    results[COLD_PEFT] = median_ms(cold)
    loads = []
    previous = "default"
    for index in range(swaps + 1):
        name = f"adapter{index}"
        path = str(paths[index % 3])

        def load_and_set(n: str = name, p: str = path) -> None:
            peft_model.load_adapter(p, adapter_name=n)
            peft_model.set_adapter(n)

        seconds = timed(load_and_set, device)
        peft_model.delete_adapter(previous)
        previous = name
        if index:
            loads.append(seconds)
    results[LOAD_PEFT] = median_ms(loads)
    return results, adapter_logits


def ratio(results: dict[str, tuple[float, float]], ours: str, theirs: str) -> str:
    (value, best), (reference, reference_best) = results[ours], results[theirs]
    return (
        f"{value / reference:.3f}x (medians {value:.2f} / {reference:.2f} ms; bests "
        f"{best:.2f} / {reference_best:.2f} ms: {best / reference_best:.3f}x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swaps", type=int, default=20, help="timed swaps per method")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device, swaps = args.device, args.swaps
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory(prefix="peftreg-bench-swap-") as tmp:
        started = time.perf_counter()
        model = make_model(device)
        parameters = sum(p.numel() for p in model.parameters())
        paths = save_adapters(model, Path(tmp), 3)
        size = adapter_bytes(paths[0])
        print(
            f"model: random Llama, {parameters / 1e9:.2f}B parameters, fp32 on {device}; "
            f"adapters: rank {RANK} on {len(TARGETS)} linear layers x 24 "
            f"({size / MiB:.1f} MiB each); setup {time.perf_counter() - started:.0f} s"
        )
        ids = torch.randint(0, 32000, (1, 16), generator=torch.Generator().manual_seed(0))
        ids = ids.to(device)
        base_logits = logits(model, ids)
        results, copied, host_bytes, ours = bench_peftreg(model, paths, ids, swaps, device)
        gc.collect()
        peft_results, theirs = bench_peft(model, paths, ids, swaps, device)
        results.update(peft_results)
    bandwidth = copy_bandwidth(device)
    print(f"\nswap latency over {swaps} swaps (median, best):")
    for label, (value, best) in results.items():
        print(f"  {label:<58} {value:9.2f} ms {best:9.2f} ms")
    print("\nlike for like (peftreg / peft), against the targets of issue 18:")
    for kind, mine, peer, target in (
        ("WARM, adapter in memory", WARM_OURS, WARM_PEFT, WARM_TARGET),
        ("COLD, adapter from disk", COLD_OURS, COLD_PEFT, COLD_TARGET),
    ):
        met = results[mine][0] / results[peer][0] <= target
        verdict = "met" if met else "NOT met"
        print(f"  {kind}: {ratio(results, mine, peer)}; target <= {target}x: {verdict}")
    print(f"  cold vs load_adapter + set_adapter: {ratio(results, COLD_OURS, LOAD_PEFT)}")
    for kind in ("warm", "cold"):
        print(
            f"\nbytes copied per {kind} swap (staged into slots): {copied[kind] / MiB:.2f} MiB; "
            f"adapter tensors file {size / MiB:.2f} MiB ({copied[kind] / size:.2f}x)"
        )
    print(
        f"copy bandwidth on {device}: {bandwidth / 1e9:.1f} GB/s -> copying the adapter's "
        f"bytes once would take {2 * size / bandwidth * 1000:.2f} ms (read + write); "
        f"a swap served in place copies {copied['warm'] / MiB:.2f} MiB"
    )
    print(f"host buffers: {host_bytes / MiB:.1f} MiB (two sets, max rank {RANK})")
    print(
        f"max |logits peftreg - peft| with the same adapter: {(ours - theirs).abs().max():.2e} "
        f"(the adapter moves them by {(ours - base_logits).abs().max():.2e})"
    )


if __name__ == "__main__":
    main()
