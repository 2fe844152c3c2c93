"""peftreg's streaming merge against peft merge_and_unload() + save_pretrained(), on ~1 GB.

Builds a randomly initialized fp16 Llama-architecture model of about 1 GB
(hidden 2048, intermediate 5632, 8 layers, vocab 32000: 542 M parameters)
and a rank-16 LoRA on every linear layer (random non-zero B), saves both,
then runs each contender in its own subprocess so that each peak RSS is its
own (`getrusage(RUSAGE_SELF).ru_maxrss` reported by the child):

- peft: from_pretrained (fp16), PeftModel.from_pretrained, merge_and_unload,
  save_pretrained (timed without and with an fsync of what it wrote, since
  peftreg's time includes fsyncing its output);
- peftreg: `peftreg.merge.merge_to_directory` (fp16 out) on the CPU, where
  peft runs, with torch on one intra-op thread as `peftreg merge` runs it;
- peftreg + INT4: the same with `peftreg.quantize.Int4Encoder` (W4A16,
  compressed-tensors pack-quantized, group 128) and torch's default threads
  (as `peftreg merge --quantize int4` runs it), for INT4 export time per GB,
  with and without the merge's own time.

Each contender runs `--repeat` times (default 3), alternated so all see the
same machine load; the best time and the largest peak RSS are reported.

The parent imports nothing heavy (Linux carries a process's peak RSS
across exec into its children's `ru_maxrss`), and compares outputs in a
child too. Times are of the work itself (imports excluded, reported apart); `os.sync()`
runs before each step so none pays for an earlier one's writeback. A disk with
a throughput cap may still slow the fsyncs of the step that follows a 1 GB
write (measured on the 2-core development VM: a 1 GB peftreg merge took
0.9 s alone and 2-3 s right after a 1 GB `dd ... conv=fsync`). Targets:
peftreg/peft wall time <= 0.5, peak RSS <= 0.25.

Run: `make bench-merge`, or `.venv/bin/python benchmarks/bench_merge.py [--layers 8]`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GB = 10**9
CHILD_STEPS = ("setup", "peft", "peftreg", "peftreg-int4", "compare")
SAMPLE_TENSORS = (
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.3.mlp.down_proj.weight",
    "model.embed_tokens.weight",
    "lm_head.weight",
)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# -- children -------------------------------------------------------------------------------


def child_setup(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The random fp16 base and the rank-16 all-linear LoRA, saved."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 128,
        num_key_value_heads=args.hidden // 128,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        dtype="float16",
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.float16)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02, generator=generator)
    model.eval()
    model.save_pretrained(str(root / "base"))
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.01, generator=generator)
    peft_model.save_pretrained(str(root / "adapter"))
    weights = sum(p.stat().st_size for p in (root / "base").glob("*.safetensors"))
    return {"parameters": sum(p.numel() for p in model.parameters()), "bytes": weights}


def child_peft(root: Path, out: Path) -> dict[str, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(root / "base"), dtype=torch.float16)
    model = PeftModel.from_pretrained(model, str(root / "adapter"))
    merged = model.merge_and_unload()
    merged.save_pretrained(str(out))
    seconds = time.perf_counter() - started
    # peftreg fsyncs what it writes; save_pretrained does not. The same fsyncs here give
    # the like-for-like time of a durable peft export.
    for path in sorted(out.iterdir()):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    descriptor = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    return {"seconds": seconds, "durable_seconds": time.perf_counter() - started}


def child_peftreg(root: Path, out: Path, quantize: bool) -> dict[str, Any]:
    from peftreg.checkpoint.encoding import TensorEncoder
    from peftreg.cli.merge import single_threaded_cpu_merge
    from peftreg.merge import adapter_from_peft_directory, merge_to_directory

    encoder: TensorEncoder | None = None
    encoding = [0.0]  # seconds inside the INT4 encoder (quantize + pack)
    started = time.perf_counter()
    if quantize:
        from peftreg.quantize import Int4Encoder

        config = json.loads((root / "base" / "config.json").read_text())
        int4 = Int4Encoder.for_model_config(config, group_size=128, device="cpu")
        encode = int4.encode

        def timed_encode(name: str, tensor: Any, dtype: Any) -> Any:
            began = time.perf_counter()
            encoded = encode(name, tensor, dtype)
            encoding[0] += time.perf_counter() - began
            return encoded

        int4.encode = timed_encode  # type: ignore[method-assign]
        encoder = int4
    with single_threaded_cpu_merge(not quantize):  # as `peftreg merge` runs on the CPU
        result = merge_to_directory(
            root / "base",
            [adapter_from_peft_directory(root / "adapter")],
            out,
            encoder=encoder,
            device="cpu",  # peft merges on the CPU: compare like with like
        )
    return {
        "seconds": time.perf_counter() - started,
        "encode_seconds": encoding[0],
        "device": result.device,
    }


def run_child(argv: list[str]) -> dict[str, Any]:
    """Run this script as a child for one step; its JSON report, with wall time added."""
    os.sync()
    started = time.perf_counter()
    child = subprocess.run(
        [sys.executable, __file__, *argv], capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - started
    if child.returncode != 0:
        sys.stderr.write(child.stderr)
        raise SystemExit(f"{argv[0]} step failed with exit code {child.returncode}")
    report: dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
    report["process_seconds"] = wall
    return report


def child_main(argv: list[str]) -> None:
    step, root = argv[0], Path(argv[1])
    if step == "setup":
        parser = argparse.ArgumentParser()
        add_shape_arguments(parser)
        report = child_setup(root, parser.parse_args(argv[2:]))
    elif step == "peft":
        report = child_peft(root, Path(argv[2]))
    elif step == "compare":
        report = {"difference": sample_difference(root, Path(argv[2]))}
    elif step in ("peftreg", "peftreg-int4"):
        report = child_peftreg(root, Path(argv[2]), quantize=step == "peftreg-int4")
    else:
        raise SystemExit(f"unknown step {step}")
    report["peak_rss"] = peak_rss_bytes()
    print(json.dumps(report))


# -- parent ---------------------------------------------------------------------------------


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)


def sample_difference(first: Path, second: Path) -> float:
    """Max |a - b| over a few tensors of two merged fp16 checkpoints (rounding only)."""
    from safetensors import safe_open

    def find(directory: Path, name: str) -> Any:
        for shard in sorted(directory.glob("*.safetensors")):
            with safe_open(str(shard), "pt") as handle:
                if name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    return handle.get_tensor(name).float()
        raise KeyError(name)

    return max(
        (find(first, name) - find(second, name)).abs().max().item() for name in SAMPLE_TENSORS
    )


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest run's times, and the largest peak RSS over all runs."""
    fastest = dict(min(runs, key=lambda run: run["seconds"]))
    fastest["process_seconds"] = min(run["process_seconds"] for run in runs)
    fastest["peak_rss"] = max(run["peak_rss"] for run in runs)
    return fastest


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} CPUs"


def human(size: float) -> str:
    return f"{size / 2**20:,.0f} MiB"


def main() -> None:  # noqa: PLR0915
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add_shape_arguments(parser)
    parser.add_argument("--no-int4", action="store_true", help="Skip the INT4 export.")
    parser.add_argument("--repeat", type=int, default=3, help="Runs of each merge.")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="Where models are written (default: the system temp dir). A tmpfs such as "
        "/dev/shm takes the disk's write speed out of both sides.",
    )
    args = parser.parse_args()
    print(f"work directory: {args.workdir or tempfile.gettempdir()}")
    with tempfile.TemporaryDirectory(prefix="peftreg-bench-merge-", dir=args.workdir) as tmp:
        root = Path(tmp)
        shape = [
            f"--layers={args.layers}",
            f"--hidden={args.hidden}",
            f"--intermediate={args.intermediate}",
            f"--vocab={args.vocab}",
        ]
        setup = run_child(["setup", str(root), *shape])
        size = setup["bytes"]
        print(
            f"base: random fp16 Llama, {setup['parameters'] / 1e6:.0f} M parameters, "
            f"{size / GB:.2f} GB of safetensors; LoRA r=16 on all linear layers"
        )
        with_int4 = not args.no_int4
        if with_int4 and importlib.util.find_spec("peftreg.quantize") is None:
            print("peftreg.quantize is not installed: INT4 export skipped")
            with_int4 = False
        peft_runs: list[dict[str, Any]] = []
        our_runs: list[dict[str, Any]] = []
        int4_runs: list[dict[str, Any]] = []
        difference = 0.0
        for _ in range(args.repeat):  # alternated, so all see the same machine load
            peft_runs.append(run_child(["peft", str(root), str(root / "out-peft")]))
            our_runs.append(run_child(["peftreg", str(root), str(root / "out-peftreg")]))
            compared = run_child(["compare", str(root / "out-peft"), str(root / "out-peftreg")])
            difference = max(difference, compared["difference"])
            shutil.rmtree(root / "out-peft")
            shutil.rmtree(root / "out-peftreg")
            if with_int4:
                int4_runs.append(run_child(["peftreg-int4", str(root), str(root / "out-int4")]))
                shutil.rmtree(root / "out-int4")
        peft, ours = best(peft_runs), best(our_runs)
        rows = [("peft merge_and_unload + save_pretrained", peft), ("peftreg merge", ours)]
        int4 = best(int4_runs) if int4_runs else None
        if int4 is not None:
            rows.append(("peftreg merge + INT4 (g128)", int4))
        print(f"best of {args.repeat} runs each (peak RSS: the largest); load {load()}")
        listed = (("peft", peft_runs), ("peftreg", our_runs), ("peftreg INT4", int4_runs))
        for label, runs in listed:
            if runs:
                listing = ", ".join(f"{r['seconds']:.2f} s {human(r['peak_rss'])}" for r in runs)
                print(f"  {label} runs: {listing}")
        print(f"{'':42} {'work s':>8} {'process s':>10} {'peak RSS':>12}")
        for label, row in rows:
            print(
                f"{label:42} {row['seconds']:8.2f} {row['process_seconds']:10.2f} "
                f"{human(row['peak_rss']):>12}"
            )
        time_ratio = ours["seconds"] / peft["seconds"]
        durable_peft = min(run["durable_seconds"] for run in peft_runs)
        rss_ratio = ours["peak_rss"] / peft["peak_rss"]
        print(
            f"peftreg/peft: wall time {time_ratio:.2f}x (target <= 0.5), "
            f"process time {ours['process_seconds'] / peft['process_seconds']:.2f}x, "
            f"peak RSS {rss_ratio:.2f}x (target <= 0.25); device {ours['device']}"
        )
        print(
            f"peftreg/peft with peft's output fsynced too (best {durable_peft:.2f} s): wall "
            f"time {ours['seconds'] / durable_peft:.2f}x"
        )
        print(
            f"max |peftreg - peft| over {len(SAMPLE_TENSORS)} sampled fp16 tensors: {difference:g}"
        )
        if int4 is not None:
            gigabytes = size / GB
            extra = int4["seconds"] - ours["seconds"]
            print(
                f"INT4 export (best run, device {int4['device']}): "
                f"{int4['seconds'] / gigabytes:.2f} s per GB of fp16 weights including the "
                f"merge; {int4['encode_seconds'] / gigabytes:.2f} s per GB excluding it (time "
                f"inside the INT4 encoder: quantize + pack); {extra / gigabytes:.2f} s per GB "
                "more than the best plain merge (which writes about twice the bytes)"
            )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in CHILD_STEPS:
        child_main(sys.argv[1:])
    else:
        main()
