"""Throughput of mixed-adapter batches on a ~0.5B random Llama (rank-16 LoRAs on every linear
layer), in one run, on the same model and the same adapters:

- peftreg `MultiAdapterHost`: every row of a batch on its own adapter, all adapters resident
  in slots (gathered batched matmuls);
- peft's mixed-batch inference (`generate(..., adapter_names=[...])`), all adapters loaded;
- peftreg `AdapterHost`, one adapter at a time: the batch split by adapter, a (warm, LRU)
  swap before each part;
- the base model without adapters (the ceiling).

Each batch is `--batch` sequences of `--prompt` random tokens, greedy-decoded for
`--new-tokens` tokens with the KV cache; with N distinct adapters, row i of batch j uses
adapter (j * batch + i) mod N, so 64 adapters over batches of 32 take two batches to cover.
Throughput is generated tokens per second (median of `--repeats` rounds of
ceil(N / batch) batches, after a warm-up round). Prints the ratios the issue sets
targets for: peftreg / peft mixed batch (>= 3x at 8 and more adapters) and peftreg's
64-adapter / 1-adapter throughput (>= 0.7x), and checks once that the three compute the
same logits for a mixed batch.

Run: `.venv/bin/python benchmarks/bench_multi.py [--device cuda] [--layers 24]`
(`--layers 4 --repeats 1` for a quick look on a small machine).
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from peftreg.hotswap import AdapterCache, AdapterHost, HostConfig
from peftreg.hotswap.multi import MultiAdapterHost

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 16
OURS = "peftreg MultiAdapterHost (one batch, rows on their adapters)"
PEFT = "peft mixed batch (adapter_names=)"
SWAP = "peftreg AdapterHost, one adapter at a time (swap + sub-batch)"
BASE = "base model, no adapter (ceiling)"
Rows = list[int]


def make_model(args: argparse.Namespace) -> LlamaForCausalLM:
    """Defaults: hidden 1024, intermediate 4096, 24 layers, 16 heads, vocab 32000: 0.47B."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(args.device).eval()


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
                    noise = torch.randn(param.shape, generator=generator) * 0.02
                    param.copy_(noise.to(param.device))
        path = root / f"adapter-{index}"
        peft_model.save_pretrained(str(path), safe_serialization=True)
        paths.append(path)
    peft_model.unload()
    return paths


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def batches(count: int, size: int) -> list[Rows]:
    """The adapter index of every row of the ceil(count / size) batches that cover them."""
    return [
        [(batch * size + row) % count for row in range(size)]
        for batch in range(math.ceil(count / size))
    ]


def generate(model: torch.nn.Module, ids: torch.Tensor, new: int, **kwargs: object) -> None:
    model.generate(  # type: ignore[operator]
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
        **kwargs,
    )


def bench_multi(
    model: LlamaForCausalLM, paths: list[Path], setup: Setup
) -> tuple[dict[int, float], torch.Tensor]:
    """peftreg, every row of a batch on its own adapter; throughput per count, logits of
    the first mixed batch."""
    rates = {}
    started = time.perf_counter()
    with MultiAdapterHost(model, setup.config, slots=len(paths), cache=setup.cache) as multi:
        for index, path in enumerate(paths):
            multi.load(path, name=str(index))
        synchronize(setup.device)
        print(
            f"  (loading {len(paths)} adapters into slots: {time.perf_counter() - started:.1f} s)"
        )
        for n in setup.counts:

            def run(rows: Rows) -> None:
                with multi.batch([str(i) for i in rows]):
                    generate(model, setup.ids, setup.new)

            rates[n] = setup.throughput(run, n)
            print(f"  {OURS}: {n} adapters {rates[n]:.1f} tokens/s", flush=True)
        with multi.batch([str(i) for i in setup.mixed]):
            logits = model(input_ids=setup.check_ids).logits
    return rates, logits


def bench_swaps(
    model: LlamaForCausalLM, paths: list[Path], setup: Setup
) -> tuple[dict[int, float], list[torch.Tensor]]:
    """peftreg's AdapterHost, the batch split by adapter with a warm swap before each part;
    throughput per count, logits of the first rows of the mixed batch one by one."""
    rates = {}
    with AdapterHost(model, setup.config, cache=setup.cache) as host:
        adapters = [host.load(path) for path in paths]
        for n in setup.counts:

            def run(rows: Rows) -> None:
                for adapter in sorted(set(rows)):
                    part = [row for row, index in enumerate(rows) if index == adapter]
                    host.swap(adapters[adapter])
                    with host.pinned():
                        generate(model, setup.ids[part], setup.new)

            rates[n] = setup.throughput(run, n)
            print(f"  {SWAP}: {n} adapters {rates[n]:.1f} tokens/s", flush=True)
        rows = []
        for row, adapter in enumerate(setup.mixed[:4]):
            host.swap(adapters[adapter])
            rows.append(model(input_ids=setup.check_ids[row : row + 1]).logits)
    return rates, rows


def bench_peft(
    model: LlamaForCausalLM, paths: list[Path], setup: Setup
) -> tuple[dict[int, float], torch.Tensor]:
    """peft with every adapter loaded and `adapter_names=` per row."""
    rates = {}
    peft_model = PeftModel.from_pretrained(model, str(paths[0]), adapter_name="0")
    for index, path in enumerate(paths[1:], start=1):
        peft_model.load_adapter(str(path), adapter_name=str(index))
    peft_model.eval()
    for n in setup.counts:

        def run(rows: Rows) -> None:
            generate(peft_model, setup.ids, setup.new, adapter_names=[str(i) for i in rows])

        rates[n] = setup.throughput(run, n)
        print(f"  {PEFT}: {n} adapters {rates[n]:.1f} tokens/s", flush=True)
    names = [str(i) for i in setup.mixed]
    return rates, peft_model(input_ids=setup.check_ids, adapter_names=names).logits


@dataclass
class Setup:
    """What every method runs: the batches, the adapters' host config and shared LRU."""

    device: str
    counts: list[int]
    size: int
    new: int
    repeats: int
    ids: torch.Tensor
    config: HostConfig
    cache: AdapterCache

    @property
    def mixed(self) -> Rows:
        return batches(max(self.counts), self.size)[0]

    @property
    def check_ids(self) -> torch.Tensor:
        return self.ids[:, :8]

    def throughput(self, run: Callable[[Rows], None], count: int) -> float:
        """Generated tokens per second: the median of `repeats` rounds over the batches
        that cover `count` adapters, after a warm-up batch."""
        plan = batches(count, self.size)
        run(plan[0])
        rates = []
        for _ in range(self.repeats):
            synchronize(self.device)
            started = time.perf_counter()
            for rows in plan:
                run(rows)
            synchronize(self.device)
            rates.append(self.size * self.new * len(plan) / (time.perf_counter() - started))
        return statistics.median(rates)


def report(results: dict[str, dict[int, float]], counts: list[int], device: str) -> None:
    print(f"\ngenerated tokens/s ({device}), by distinct adapters in the batch:")
    print(f"  {'':<62}" + "".join(f"{n:>10}" for n in counts))
    for label, row in results.items():
        cells = "".join(f"{row[n]:>10.1f}" if n in row else f"{'':>10}" for n in counts)
        print(f"  {label:<62}{cells}")
    ours, peft, swap = results[OURS], results[PEFT], results[SWAP]
    base = results[BASE][counts[0]]
    print("\nratios (targets: >= 3x peft's mixed batch at 8 and more adapters):")
    for n in counts:
        print(
            f"  {n:>3} adapters: peftreg / peft mixed batch {ours[n] / peft[n]:.2f}x; "
            f"/ one-at-a-time swaps {ours[n] / swap[n]:.2f}x; / base model {ours[n] / base:.2f}x"
        )
    flat = ours[counts[-1]] / ours[counts[0]]
    print(f"  peftreg {counts[-1]} adapters / {counts[0]} adapter: {flat:.2f}x (target >= 0.7x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--adapters", default="1,8,32,64", help="distinct adapters per run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    counts = [int(item) for item in args.adapters.split(",")]
    ids = torch.randint(0, args.vocab, (args.batch, args.prompt), generator=torch.Generator())
    setup = Setup(
        args.device,
        counts,
        args.batch,
        args.new_tokens,
        args.repeats,
        ids.to(args.device),
        HostConfig(targets=TARGETS, max_rank=RANK, dora=False),
        AdapterCache(max(counts) + 2, 1 << 40),
    )
    results: dict[str, dict[int, float]] = {}
    with tempfile.TemporaryDirectory(prefix="peftreg-bench-multi-") as tmp:
        started = time.perf_counter()
        model = make_model(args)
        parameters = sum(p.numel() for p in model.parameters())
        paths = save_adapters(model, Path(tmp), max(counts))
        print(
            f"model: random Llama, {parameters / 1e9:.2f}B parameters, fp32 on {args.device}; "
            f"{len(paths)} adapters of rank {RANK} on {len(TARGETS)} linear layers x "
            f"{args.layers}; batches of {args.batch} x {args.prompt} prompt tokens, "
            f"{args.new_tokens} new tokens; setup {time.perf_counter() - started:.0f} s",
            flush=True,
        )
        base_logits = model(input_ids=setup.check_ids).logits
        results[OURS], ours = bench_multi(model, paths, setup)
        results[SWAP], swapped = bench_swaps(model, paths, setup)
        setup.cache.clear()
        gc.collect()
        results[BASE] = {
            counts[0]: setup.throughput(lambda rows: generate(model, setup.ids, setup.new), 1)
        }
        results[PEFT], theirs = bench_peft(model, paths, setup)
    report(results, counts, args.device)
    swap_diff = max((ours[r : r + 1] - s).abs().max().item() for r, s in enumerate(swapped))
    print(
        f"\nmax |logits| difference on a mixed batch: peftreg multi vs peft "
        f"{(ours - theirs).abs().max().item():.2e}; vs AdapterHost one at a time "
        f"{swap_diff:.2e} (the adapters move them by "
        f"{(ours - base_logits).abs().max().item():.2e})"
    )


if __name__ == "__main__":
    main()
