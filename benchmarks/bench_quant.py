"""INT4 and GGUF quality: held-out perplexity of one small trained Llama, fp16 against each export.

Real text that ships with Python: the standard library's help topics
(`pydoc_data.topics`, ~460 k characters of the language reference). The last
`--held-out` fraction is held out; a byte-level BPE tokenizer (`tokenizers`)
and a small Llama-architecture model are trained on the rest for `--minutes`
of CPU time, so the weights get real structure (outlier channels, unequal
rows) that a random model lacks. The model is saved in fp16, then exported:

- INT4 (compressed-tensors W4A16, as `peftreg export --quantize int4`):
  round-to-nearest (`rtn`) and the per-group scale search (`mse`), at group
  size 128 and 32, scored in transformers (compressed-tensors installed);
- INT4 calibrated through llm-compressor (as `peftreg export --quantize int4
  --algorithm gptq|awq --calibration REF`): GPTQ and AWQ at group size 128 and
  32, calibrated on `--calibration-samples` windows of `--calibration-length`
  tokens of the training text (never the held-out part); each runs in a child
  process whose peak RSS is measured;
- GGUF (`peftreg export --format gguf`): f16, q8_0, q4_0 and q4_k_m, scored
  by llama.cpp itself (node-llama-cpp, `npm ci --prefix tests/llamacpp
  --omit=optional`).

Every score is `peftreg.quality.perplexity` over the same held-out text in
windows of `--window` tokens; the table gives each perplexity and its gap
to fp16 as a fraction of fp16's (the fp16 GGUF in llama.cpp checks that the
two runtimes agree), then whether GPTQ or AWQ closes at least half of RTN's
gap at the same group size.

Memory of a calibrated run: the child's peak RSS minus its RSS once torch,
transformers and llm-compressor are imported (the model, calibration
activations, Hessians, compression and saving). A fixed part (activation
caches, the tokenizer, allocator slack) does not grow with the model, so the
per-parameter figure is the slope between two models: the trained one and a
random `--probe-hidden` Llama of ~100 M parameters (`--no-memory-probe` skips
it), both calibrated the same way (`--probe-samples` windows of
`--probe-length` tokens). The README's per-billion figure is that slope
times 10^9.

Run: `make bench-quant` (about 12 minutes on 2 cores), or
`.venv/bin/python benchmarks/bench_quant.py --minutes 3 --hidden 256 --layers 4`.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODULES = ROOT / "tests" / "llamacpp" / "node_modules"
SPECIAL = "<|endoftext|>"


def corpus() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def train_tokenizer(text: str, vocab: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=SPECIAL, eos_token=SPECIAL)


def train_model(args: argparse.Namespace, train_text: str, directory: Path) -> dict[str, Any]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(train_text, args.vocab)
    ids = torch.tensor(tokenizer(train_text)["input_ids"])
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 128),
        max_position_embeddings=args.window,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    started = time.perf_counter()
    budget = args.minutes * 60
    steps = 0
    generator = torch.Generator().manual_seed(1)
    loss = torch.tensor(float("nan"))
    model.train()
    while time.perf_counter() - started < budget:
        starts = torch.randint(0, len(ids) - args.window - 1, (args.batch,), generator=generator)
        batch = torch.stack([ids[s : s + args.window] for s in starts.tolist()])
        progress = (time.perf_counter() - started) / budget
        for group in optimizer.param_groups:  # linear warm-up, cosine decay over the budget
            group["lr"] = args.lr * min(1.0, steps / 30) * 0.5 * (1 + math.cos(math.pi * progress))
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        steps += 1
        if steps % 50 == 0:
            print(f"  step {steps}: loss {loss.item():.3f}", file=sys.stderr, flush=True)
    model.eval()
    model.to(torch.float16).save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    parameters = sum(p.numel() for p in model.parameters())
    return {
        "steps": steps,
        "train_tokens": len(ids),
        "final_loss": round(loss.item(), 4),
        "parameters": parameters,
    }


def no_op_adapter(base: Path, directory: Path) -> Any:
    """A LoRA whose B is zero (peft's initialization): merging it changes nothing, so the
    export is the base itself, through the same code path as a real export."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from peftreg.merge.inputs import adapter_from_peft_directory

    model = AutoModelForCausalLM.from_pretrained(base)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        str(directory)
    )
    return adapter_from_peft_directory(directory)


def int4_export(base: Path, adapter: Any, output: Path, algorithm: str, group: int) -> None:
    from peftreg.merge.model_dir import read_model_config
    from peftreg.merge.stream import merge_to_directory
    from peftreg.quantize import Int4Encoder

    encoder = Int4Encoder.for_model_config(
        read_model_config(base),
        group_size=group,
        algorithm="mse" if algorithm == "mse" else "rtn",
        device="cpu",
    )
    merge_to_directory(base, [adapter], output, encoder=encoder, device="cpu")


def rss_bytes(field: str) -> int:
    """`VmRSS` (now) or `VmHWM` (peak since the last reset) of this process, Linux."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> None:
    """Start `VmHWM` again from the current RSS (writing 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def calibrate_child(spec: dict[str, Any]) -> None:
    """In a child process: GPTQ/AWQ `spec["model"]` into `spec["output"]`, print the stats."""
    import torch  # noqa: F401  (imported before the baseline is taken)
    import transformers  # noqa: F401

    from peftreg.formats.calibration import parse_calibration
    from peftreg.quantize.calibrated import (
        CalibrationSettings,
        load_llmcompressor,
        quantize_calibrated,
    )

    load_llmcompressor()  # import llm-compressor before the baseline too
    reset_peak_rss()  # the imports' own transient peak is not the run's
    baseline = rss_bytes("VmRSS")
    calibration = Path(spec["calibration"])
    documents = parse_calibration(calibration.read_bytes(), calibration.name)
    result = quantize_calibrated(
        Path(spec["model"]),
        Path(spec["output"]),
        documents,
        algorithm=spec["algorithm"],
        group_size=spec["group"],
        settings=CalibrationSettings(samples=spec["samples"], max_sequence_length=spec["length"]),
    )
    print(
        json.dumps(
            {
                "baseline_rss": baseline,
                "peak_rss": rss_bytes("VmHWM"),
                "seconds": result.seconds,
                "samples": result.samples,
                "tokens": result.tokens,
            }
        )
    )


def calibrated_export(spec: dict[str, Any]) -> dict[str, Any]:
    """Run `calibrate_child` in a fresh process (its own peak RSS); its stats."""
    done = subprocess.run(
        [sys.executable, __file__, "--calibrate-child", json.dumps(spec)],
        check=True,
        capture_output=True,
        text=True,
    )
    stats: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return stats


def probe_model(args: argparse.Namespace, tokenizer_dir: Path, directory: Path) -> int:
    """A random fp16 Llama of `--probe-hidden` with the trained tokenizer; its parameters."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.probe_hidden,
        intermediate_size=args.probe_hidden * 11 // 4,
        num_hidden_layers=args.probe_layers,
        num_attention_heads=args.probe_hidden // 64,
        num_key_value_heads=args.probe_hidden // 128,
        max_position_embeddings=args.window,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = LlamaForCausalLM(config)
    model.to(torch.float16).save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    return sum(p.numel() for p in model.parameters())


def calibrated_rows(
    args: argparse.Namespace,
    root: Path,
    base: Path,
    train_text: str,
    held_out: str,
    training: dict[str, Any],
    rows: list[tuple[str, str, float]],
) -> list[dict[str, Any]]:
    """GPTQ and AWQ rows appended to `rows`; the memory of every calibrated run."""
    from peftreg.quality.perplexity import transformers_perplexity

    calibration = root / "calibration.txt"
    calibration.write_text(train_text, encoding="utf-8")
    memory: list[dict[str, Any]] = []
    for algorithm in ("gptq", "awq"):
        for group in (128, 32):
            output = root / f"int4-{algorithm}-g{group}"
            spec = {
                "model": str(base),
                "output": str(output),
                "calibration": str(calibration),
                "algorithm": algorithm,
                "group": group,
                "samples": args.calibration_samples,
                "length": min(args.calibration_length, args.window),
            }
            stats = calibrated_export(spec)
            memory.append(
                {
                    **stats,
                    "model": "trained",
                    "algorithm": algorithm,
                    "group": group,
                    "parameters": training["parameters"],
                }
            )
            score = transformers_perplexity(output, held_out, window=args.window)
            rows.append((f"INT4 {algorithm} g{group}", "transformers", score.perplexity))
            print(f"  {rows[-1]} {stats}", file=sys.stderr, flush=True)
    if args.memory_probe:  # both models calibrated alike, on fewer tokens (AWQ is slow)
        probe = root / "probe"
        models = {
            "trained": (base, training["parameters"]),
            "probe": (probe, probe_model(args, base, probe)),
        }
        for name, (directory, parameters) in models.items():
            for algorithm in ("gptq", "awq"):
                spec = {
                    "model": str(directory),
                    "output": str(root / f"memory-{name}-{algorithm}"),
                    "calibration": str(calibration),
                    "algorithm": algorithm,
                    "group": 128,
                    "samples": args.probe_samples,
                    "length": min(args.probe_length, args.window),
                }
                stats = calibrated_export(spec)
                memory.append(
                    {
                        **stats,
                        "model": name,
                        "algorithm": algorithm,
                        "group": 128,
                        "parameters": parameters,
                        "probe": True,
                    }
                )
                print(f"  memory {name} {algorithm}: {stats}", file=sys.stderr, flush=True)
    return memory


def report_calibrated(
    rows: list[tuple[str, str, float]], reference: float, memory: list[dict[str, Any]]
) -> None:
    """Whether GPTQ / AWQ close half of RTN's gap, and the memory of the calibrated runs."""
    scores = {name: value for name, _, value in rows}
    for group in (128, 32):
        rtn_gap = scores[f"INT4 rtn g{group}"] - reference
        for algorithm in ("gptq", "awq"):
            if rtn_gap <= 0:
                print(f"{algorithm} g{group}: rtn has no gap to fp16 here, nothing to close")
                continue
            closed = (scores[f"INT4 rtn g{group}"] - scores[f"INT4 {algorithm} g{group}"]) / rtn_gap
            verdict = "yes" if closed >= 0.5 else "no"
            print(
                f"{algorithm} g{group} closes {closed:+.0%} of rtn's gap to fp16 "
                f"(target: at least half): {verdict}"
            )
    print(
        f"\n{'calibrated run':<22} {'params':>8} {'peak RSS':>10} {'over imports':>13} "
        f"{'seconds':>8}"
    )
    for item in memory:
        label = f"{item['model']}{' mem' if item.get('probe') else ''} {item['algorithm']}"
        print(
            f"{label + ' g' + str(item['group']):<22} "
            f"{item['parameters'] / 1e6:>7.1f}M {item['peak_rss'] / 2**20:>8.0f}MiB "
            f"{(item['peak_rss'] - item['baseline_rss']) / 2**20:>10.0f}MiB "
            f"{item['seconds']:>8.1f}"
        )
    for algorithm in ("gptq", "awq"):
        runs = {
            item["model"]: item
            for item in memory
            if item["algorithm"] == algorithm and item.get("probe")
        }
        if "probe" not in runs:
            continue
        small, large = runs["trained"], runs["probe"]
        grown = (large["peak_rss"] - large["baseline_rss"]) - (
            small["peak_rss"] - small["baseline_rss"]
        )
        slope = grown / (large["parameters"] - small["parameters"])
        print(
            f"{algorithm}: {slope:.1f} bytes per parameter over the imports "
            f"(slope between the two models): {slope * 1e9 / 2**30:.1f} GiB per billion "
            f"parameters, plus {(small['peak_rss'] - small['baseline_rss']) / 2**20:.0f} MiB "
            "fixed, plus the imports"
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=8.0, help="CPU training budget")
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--held-out", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--calibration-length", type=int, default=256)
    parser.add_argument("--probe-hidden", type=int, default=1024)
    parser.add_argument("--probe-layers", type=int, default=8)
    parser.add_argument("--probe-samples", type=int, default=8)
    parser.add_argument("--probe-length", type=int, default=128)
    parser.add_argument("--memory-probe", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser.parse_args()


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--calibrate-child":
        calibrate_child(json.loads(sys.argv[2]))
        return
    args = parse_args()

    from peftreg.gguf.model import export_gguf
    from peftreg.gguf.runtime import LlamaCppRuntime
    from peftreg.quality.perplexity import transformers_perplexity

    text = corpus()
    cut = int(len(text) * (1 - args.held_out))
    train_text, held_out = text[:cut], text[cut:]
    with tempfile.TemporaryDirectory(dir=args.workdir) as temporary:
        root = Path(temporary)
        base = root / "fp16"
        print(f"training {args.minutes} min on {len(train_text)} characters", file=sys.stderr)
        training = train_model(args, train_text, base)
        print(f"trained: {json.dumps(training)}", file=sys.stderr)
        adapter = no_op_adapter(base, root / "no-op")
        rows: list[tuple[str, str, float]] = []
        fp16 = transformers_perplexity(base, held_out, window=args.window)
        rows.append(("fp16", "transformers", fp16.perplexity))
        for algorithm in ("rtn", "mse"):
            for group in (128, 32):
                output = root / f"int4-{algorithm}-g{group}"
                int4_export(base, adapter, output, algorithm, group)
                score = transformers_perplexity(output, held_out, window=args.window)
                rows.append((f"INT4 {algorithm} g{group}", "transformers", score.perplexity))
                print(f"  {rows[-1]}", file=sys.stderr, flush=True)
        memory = calibrated_rows(args, root, base, train_text, held_out, training, rows)
        runtime = LlamaCppRuntime.locate(MODULES)
        for quantization in ("f16", "q8_0", "q4_0", "q4_k_m"):
            path = root / f"model-{quantization}.gguf"
            export_gguf(base, [adapter], path, quantization=quantization, device="cpu")
            [answer] = runtime.run(
                path,
                [{"kind": "perplexity", "text": held_out, "window": args.window}],
                context=args.window,
                threads=args.threads,
            )
            perplexity = math.exp(answer["nll"] / answer["count"])
            rows.append((f"GGUF {quantization}", "llama.cpp", perplexity))
            print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    reference = rows[0][2]
    print(
        f"\nheld-out: {len(held_out)} characters, {fp16.scored} tokens scored, window "
        f"{args.window}; model {training['parameters'] / 1e6:.1f} M parameters, "
        f"{training['steps']} steps, final train loss {training['final_loss']}"
    )
    print(f"{'export':<20} {'runtime':<13} {'perplexity':>10} {'gap to fp16':>12}")
    for name, where, value in rows:
        print(f"{name:<20} {where:<13} {value:>10.4f} {(value - reference) / reference:>+12.2%}")
    report_calibrated(rows, reference, memory)
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {"training": training, "rows": rows, "memory": memory, "args": vars(args)},
                indent=2,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
