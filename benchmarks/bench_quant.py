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
- GGUF (`peftreg export --format gguf`): f16, q8_0, q4_0 and q4_k_m, scored
  by llama.cpp itself (node-llama-cpp, `npm ci --prefix tests/llamacpp
  --omit=optional`).

Every score is `peftreg.quality.perplexity` over the same held-out text in
windows of `--window` tokens; the table gives each perplexity and its gap
to fp16 as a fraction of fp16's (the fp16 GGUF in llama.cpp checks that the
two runtimes agree). GPTQ and AWQ (llm-compressor) are not run: its newest
release pins transformers and compressed-tensors below this project's lock
(see the README).

Run: `make bench-quant` (about 12 minutes on 2 cores), or
`.venv/bin/python benchmarks/bench_quant.py --minutes 3 --hidden 256 --layers 4`.
"""

from __future__ import annotations

import argparse
import json
import math
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


def main() -> None:
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
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

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
    print("GPTQ / AWQ (llm-compressor): not run, its pins conflict with the lock (README)")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {"training": training, "rows": rows, "args": vars(args)}, indent=2, default=str
            )
        )


if __name__ == "__main__":
    main()
