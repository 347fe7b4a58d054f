"""Full fine-tuning vs LoRA, lmforge vs transformers (+ peft), on the same model, data and batches.

Regime: instruction-tuning a small pretrained model on a CPU. Four sides train for the same
number of steps on identical padded batches (the SFT stage's length-grouped plan over the
recipe's instruction data) and report tokens/s (padding not counted), the held-out loss on assistant
replies before and after, trainable parameters and memory. Each side runs in a fresh process so
that peak memory is its own: `rss_train_mb` is peak RSS minus RSS once the model and data are
loaded (gradients, optimizer moments and activations), the figure LoRA exists to shrink. Across
trainers compare the peak itself: transformers' loaded weights may still be file pages not yet
resident, which then count as "training" memory.

    python benchmarks/sft_lora.py                        # runs/tiny/pretrain/model, 40 steps
    python benchmarks/sft_lora.py --model DIR --steps 100 --r 16 --sides ours-full,ours-lora

Step times: each side also reports its median step time after the warm-up, in wall seconds and
in CPU seconds of the process (all threads; nearly free of waiting for cores other jobs hold),
and its losses on the first batches: before any update the two trainers see the same weights
and the same batch, so their first losses must agree (and, for full fine-tuning with the same
AdamW, the next ones).
On a real model, e.g. the imported SmolLM2 (its own tokenizer encodes the recipe's data):

    python benchmarks/sft_lora.py --model ~/.cache/lmforge/models/smollm2-135m-instruct \
        --steps 5 --warmup 2 --rounds 2 --batch-size 4 --pack 256 --lr-full 2e-5 --lr-lora 2e-4 \
        --val-examples 0

`--pack 256` makes every step 4 x 256 tokens: the bundled conversations are ~65 tokens.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

SIDES = ("ours-full", "ours-lora", "hf-full", "hf-peft-lora")
TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]


def rss_mb() -> float:
    """Current resident set size in MB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def packed_batches(train: list, plan, batch_size: int, seq_len: int, steps: int) -> list[list]:
    """Rows of exactly seq_len tokens: the plan's conversations in order, concatenated with
    their reply-only labels, the last of a row cut there. Every step then holds batch_size x
    seq_len tokens whatever the data's lengths (the bundled conversations are ~65 tokens, too
    short to load a real model); attention crosses the joins, as in packed pretraining."""
    stream = (train[i] for step in itertools.count() for i in plan(step))
    rows = []
    for _ in range(steps * batch_size):
        parts, n = [], 0
        while n < seq_len:
            parts.append(next(stream)[:, : seq_len - n])
            n += parts[-1].shape[1]
        rows.append(np.concatenate(parts, axis=1))
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


def run_side(args) -> dict:
    """Train one side; returns its figures. Runs in its own process (see main)."""
    import torch.nn.functional as F  # noqa: F401  (imported before the RSS baseline)

    from lmforge.align.sft import build_examples, masked_nll, pad_batch
    from lmforge.config import LoRAConfig, load_recipe
    from lmforge.data.batches import BatchPlan
    from lmforge.model.checkpoint import load_model
    from lmforge.tokenizer import Tokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    recipe = load_recipe(args.recipe)
    tok = Tokenizer.load(args.model)
    train, val, _ = build_examples(recipe.sft, tok, recipe.base_dir)
    val = val[: args.val_examples]
    lora = args.side.endswith("lora")
    lr = args.lr_lora if lora else args.lr_full
    if args.side.startswith("ours"):
        from lmforge.model.lora import apply_lora
        from lmforge.train.optim import make_optimizer

        model = load_model(args.model)
        if lora:
            apply_lora(model, LoRAConfig(r=args.r, alpha=2 * args.r, targets=TARGETS), seed=0)
        cfg = type(recipe.sft)(lr=lr, weight_decay=0.0)
        opt = make_optimizer(model, cfg, torch.device("cpu"))

        def forward(x):
            return model(x)
    else:
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        if lora:
            from peft import LoraConfig, get_peft_model

            names = [f"{t}_proj" for t in TARGETS]
            model = get_peft_model(
                model, LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=names)
            )
        params = [p for p in model.parameters() if p.requires_grad]
        # the implementation make_optimizer picks for ours (fused where the build has it), so
        # the two sides differ in their model code only
        kw = dict(lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
        try:
            opt = torch.optim.AdamW(params, fused=True, **kw)
        except (RuntimeError, TypeError):
            opt = torch.optim.AdamW(params, foreach=True, **kw)

        def forward(x):
            return model(input_ids=x, use_cache=False).logits

    def held_out() -> float:
        model.eval()
        total, n = 0.0, 1e-9  # --val-examples 0: no held-out loss (reported as 0)
        with torch.no_grad():
            for i in range(0, len(val), args.batch_size):
                x, y = pad_batch(val[i : i + args.batch_size], tok.pad_id)
                nll, k = masked_nll(forward(x), y)
                total, n = total + nll.item(), n + k
        model.train()
        return total / n

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    plan = BatchPlan([e.shape[1] for e in train], args.batch_size, seed=1)
    if args.pack:
        batches = packed_batches(train, plan, args.batch_size, args.pack, args.steps)
    else:
        batches = [[train[i] for i in plan(s)] for s in range(args.steps)]
    loss_before = held_out()
    model.train()
    rss_loaded = rss_mb()
    losses, times, cpu, tokens = [], [], [], []
    for exs in batches:
        t0, c0 = time.perf_counter(), time.process_time()
        x, y = pad_batch(exs, tok.pad_id)
        nll, n = masked_nll(forward(x), y)
        (nll / n).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        # CPU seconds of all this process's threads: what the step cost, nearly free of the
        # time spent waiting for a core that other jobs hold (wall time is not)
        cpu.append(time.process_time() - c0)
        losses.append(nll.item() / n)
        # lengths, not non-pad ids: a model may pad with its EOS id, which replies contain too
        tokens.append(sum(e.shape[1] for e in exs))
    timed = slice(args.warmup, None)  # allocator and first-touch costs are not throughput
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "side": args.side,
        "trainable": trainable,
        "step_times": times[timed],
        "step_cpu": cpu[timed],
        "step_tokens": tokens[timed],
        "tokens_per_step": statistics.mean(tokens),
        "first_losses": losses[:3],
        "rss_peak_mb": peak,
        "val_before": loss_before,
        "val_after": held_out(),
        "rss_loaded_mb": rss_loaded,
        "rss_train_mb": peak - rss_loaded,
    }


def merge_rounds(runs: list[dict]) -> dict:
    """One side's processes (rounds) as one: speed over all their timed steps (median step
    time; tokens/s = all tokens / all time), memory the largest of any round."""
    times = [t for r in runs for t in r["step_times"]]
    tokens = [n for r in runs for n in r["step_tokens"]]
    cpu = [c for r in runs for c in r["step_cpu"]]
    out = {**runs[0], "rounds": len(runs), "step_times": times, "step_tokens": tokens}
    out.update(tok_s=sum(tokens) / sum(times), step_s=statistics.median(times))
    out.update(step_cpu=cpu, cpu_s=statistics.median(cpu), tok_per_cpu_s=sum(tokens) / sum(cpu))
    for key in ("rss_peak_mb", "rss_loaded_mb", "rss_train_mb"):
        out[key] = max(r[key] for r in runs)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="runs/tiny/pretrain/model", help="pretrained model dir")
    p.add_argument("--recipe", default="recipes/tiny-cpu.yaml", help="its sft: section's data")
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated from {SIDES}")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per side")
    p.add_argument("--warmup", type=int, default=3, help="steps not counted in tokens/s")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="processes per side, run in turn (order reversed every other round); speed is "
        "over all of their timed steps",
    )
    p.add_argument("--batch-size", type=int, default=8, help="conversations per step")
    p.add_argument(
        "--pack",
        type=int,
        default=0,
        metavar="T",
        help="rows of exactly T tokens, conversations packed end to end (0: one padded "
        "conversation per row)",
    )
    p.add_argument("--r", type=int, default=8, help="LoRA rank (alpha = 2r), on all 7 projections")
    p.add_argument("--lr-full", type=float, default=1e-3, help="learning rate, full fine-tuning")
    p.add_argument("--lr-lora", type=float, default=3e-3, help="learning rate, LoRA")
    p.add_argument("--val-examples", type=int, default=96, help="held-out conversations scored")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument(
        "--random",
        metavar="DIMxLAYERS",
        help="instead of --model's weights, a random model of this size (e.g. 768x12) with its "
        "tokenizer: memory and speed at a larger scale (held-out losses then mean little)",
    )
    p.add_argument("--side", help=argparse.SUPPRESS)  # internal: run one side, print JSON
    args = p.parse_args()
    if args.side:
        print(json.dumps(run_side(args)))
        return
    if not Path(args.model).is_dir():
        sys.exit(f"no model at {args.model}: run `lmforge run recipes/tiny-cpu.yaml` first")
    argv = list(sys.argv[1:])
    tmp = None
    if args.random:
        import tempfile

        from lmforge.config import ModelConfig
        from lmforge.model.checkpoint import load_config, save_model
        from lmforge.model.transformer import GPT

        dim, layers = (int(v) for v in args.random.lower().split("x"))
        base = load_config(args.model)
        cfg = ModelConfig(
            vocab_size=base.vocab_size, dim=dim, n_layer=layers, n_head=dim // 64,
            max_seq_len=base.max_seq_len, bos_token_id=base.bos_token_id,
            eos_token_id=base.eos_token_id,
        )  # fmt: skip
        torch.manual_seed(0)
        tmp = tempfile.TemporaryDirectory()
        save_model(GPT(cfg), tmp.name, tokenizer_dir=args.model)
        argv += ["--model", tmp.name]
        args.model = f"random {args.random} ({tmp.name})"
    sides = args.sides.split(",")
    runs = {side: [] for side in sides}
    for r in range(args.rounds):  # interleaved: the machine's load drifts between processes
        for side in sides if r % 2 == 0 else sides[::-1]:
            cmd = [sys.executable, __file__, *argv, "--side", side]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
            runs[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  round {r + 1}/{args.rounds} {side} done", flush=True)
    results = [merge_rounds(runs[side]) for side in sides]
    by = {r["side"]: r for r in results}
    print(
        f"{args.steps} steps x {args.batch_size} "
        f"{f'rows of {args.pack} packed tokens' if args.pack else 'conversations'}, "
        f"LoRA r={args.r} on {len(TARGETS)} projections, {args.threads} threads, "
        f"model {args.model}"
    )
    header = (
        "side", "trainable", "tok/s", "step s", "CPU s/step", "held-out before", "after", "train MB",
        "loaded MB", "peak MB",
    )  # fmt: skip
    print("  ".join(f"{h:>15}" for h in header))
    for r in results:
        cells = (
            r["side"],
            f"{r['trainable']:,}",
            f"{r['tok_s']:,.0f}",
            f"{r['step_s']:.2f}",
            f"{r['cpu_s']:.2f}",
            f"{r['val_before']:.3f}",
            f"{r['val_after']:.3f}",
            f"{r['rss_train_mb']:.0f}",
            f"{r['rss_loaded_mb']:.0f}",
            f"{r['rss_peak_mb']:.0f}",
        )
        print("  ".join(f"{c:>15}" for c in cells))
    print(f"tokens per step (mean, padding not counted): {results[0]['tokens_per_step']:.0f}")
    for kind in ("full", "lora"):
        ours = by.get(f"ours-{kind}")
        theirs = by.get("hf-full" if kind == "full" else "hf-peft-lora")
        if ours and theirs:
            print(
                f"{kind}: ours/transformers tokens/s {ours['tok_s'] / theirs['tok_s']:.2f}x, "
                f"median step time {theirs['step_s'] / ours['step_s']:.2f}x, "
                f"median CPU time per step {theirs['cpu_s'] / ours['cpu_s']:.2f}x"
            )
            pairs = " ".join(
                f"{a:.5f}/{b:.5f}" for a, b in zip(ours["first_losses"], theirs["first_losses"])
            )
            print(f"  first losses, ours/transformers: {pairs}")
    if "ours-full" in by and "ours-lora" in by:
        f, lo = by["ours-full"], by["ours-lora"]
        print(
            f"LoRA vs full (ours): {lo['trainable'] / f['trainable']:.1%} of the trainable "
            f"parameters, training memory {lo['rss_train_mb']:.0f} vs {f['rss_train_mb']:.0f} MB"
        )
    print(json.dumps({"bench": "sft_lora", "threads": args.threads, "results": results}))


if __name__ == "__main__":
    main()
