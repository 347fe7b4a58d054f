"""Training throughput of one optimizer step: lmforge's trainer step vs. transformers'
`LlamaForCausalLM` with `torch.optim.AdamW`, on the same weights, batch and threads.

Regime: small models trained on a CPU (fp32; bf16 autocast on CUDA), the tiny recipes that
let a user build a model on a laptop in minutes. There the step is neither purely matmul-bound
nor purely overhead-bound: a 1M-parameter model spends much of its step in Python, dispatch
and elementwise kernels, a 10M one mostly in GEMMs. Tokens per second decides how much model
a user gets in their time budget, and MFU (model FLOPs / measured matmul peak) says how much
of the machine's real ceiling is left on the table.

Both sides run in this one process, alternating repeat by repeat so that load from other
processes hits both alike; the table reports medians.

    python benchmarks/bench_train_throughput.py                # both configs, 2 threads
    python benchmarks/bench_train_throughput.py --configs tiny --repeats 9 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import tempfile
import time

import torch
import torch.nn.functional as F
from common import environment, median, print_json, print_table, quiet_transformers

from lmforge.config import ModelConfig, PretrainConfig
from lmforge.model.checkpoint import save_model
from lmforge.model.transformer import GPT, flops_per_token, num_params
from lmforge.perf import matmul_flops, pick_device
from lmforge.train.optim import make_optimizer

# name -> (model config, batch size, sequence length, default steps per timed repeat)
CONFIGS = {
    # the character-level Shakespeare shape: 4 x 128, vocab 65
    "tiny": (dict(vocab_size=65, dim=128, n_layer=4, n_head=4, max_seq_len=64), 12, 64, 20),
    # the tiny recipe's scale with its default tokenizer, batch and context: 6 x 384, ffn 1024,
    # vocab 8192, tied embeddings, 13.7M parameters (10.6M outside the embedding table)
    "small": (dict(vocab_size=8192, dim=384, n_layer=6, n_head=6, max_seq_len=256), 16, 256, 2),
    # recipes/tiny-cpu.yaml's model and batch as of this writing: 4 x 256, 5.3M parameters
    "recipe": (dict(vocab_size=8192, dim=256, n_layer=4, n_head=4, max_seq_len=256), 16, 256, 3),
}


def autocast(device: torch.device):
    """What the trainer does: bf16 autocast on CUDA, plain fp32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(forward, params, optimizer, x, y, device, grad_clip=1.0):
    """The trainer's inner step (lmforge/train/pretrain.py), with the model call swapped in."""
    with autocast(device):
        logits = forward(x)
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def build_pair(cfg: ModelConfig, device: torch.device):
    """Ours, and transformers' model opened from our saved checkpoint: identical weights."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    ours = GPT(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(ours, tmp)
        theirs = LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    return ours.to(device).train(), theirs.to(device).train()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_config(name: str, args, device) -> dict:
    model_kwargs, B, T, default_steps = CONFIGS[name]
    cfg = ModelConfig(**model_kwargs)
    steps = args.steps or default_steps
    ours, theirs = build_pair(cfg, device)
    train_cfg = PretrainConfig()
    # ours: the trainer's optimizer; theirs: what a typical user writes (defaults besides lr)
    sides = {
        "ours": (ours, make_optimizer(ours, train_cfg, device), ours),
        "transformers": (
            theirs,
            torch.optim.AdamW(theirs.parameters(), lr=train_cfg.lr),
            lambda x: theirs(input_ids=x, use_cache=False).logits,
        ),
    }
    if args.compile:  # the trainer compiles on CUDA only; this measures what CPU would gain
        twin = copy.deepcopy(ours)
        sides["compiled"] = (twin, make_optimizer(twin, train_cfg, device), torch.compile(twin))
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, cfg.vocab_size, (4, B, T + 1), generator=g).to(device)
    batches = [(d[:, :-1], d[:, 1:]) for d in data]

    # same weights, same batch: the first losses must agree before anything is timed
    with torch.no_grad():
        x, y = batches[0]
        l_ours = F.cross_entropy(ours(x).float().flatten(0, 1), y.flatten())
        l_theirs = F.cross_entropy(theirs(input_ids=x).logits.float().flatten(0, 1), y.flatten())
    assert abs(l_ours.item() - l_theirs.item()) < 1e-4, (
        f"losses differ: {l_ours.item()} vs {l_theirs.item()}"
    )

    def run(side: str, n: int) -> float:
        model, opt, forward = sides[side]
        params = list(model.parameters())
        sync(device)
        t = time.perf_counter()
        for i in range(n):
            x, y = batches[i % len(batches)]
            train_step(forward, params, opt, x, y, device)
        sync(device)
        return time.perf_counter() - t

    # warm-up: allocator, optimizer state, oneDNN primitive caches, compilation
    first = {side: run(side, args.warmup) for side in sides}
    times = {side: [] for side in sides}
    for r in range(args.repeats):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for side in order:
            times[side].append(run(side, steps))
    tok_s = {side: steps * B * T / median(ts) for side, ts in times.items()}
    out = {
        "config": name,
        "params": num_params(ours),
        "batch": B,
        "seq_len": T,
        "steps": steps,
        "flops_per_token": flops_per_token(cfg, T),
        "ours_tok_s": tok_s["ours"],
        "transformers_tok_s": tok_s["transformers"],
        "ratio": tok_s["ours"] / tok_s["transformers"],
        "spread_ours": max(times["ours"]) / min(times["ours"]),
        "spread_transformers": max(times["transformers"]) / min(times["transformers"]),
    }
    if args.compile:
        out["compiled_tok_s"] = tok_s["compiled"]
        out["compile_s"] = first["compiled"] - args.warmup * median(times["compiled"]) / steps
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--configs", default="tiny,small", help=f"comma-separated, from {', '.join(CONFIGS)}"
    )
    p.add_argument(
        "--repeats", type=int, default=5, help="timed repeats per side (median reported)"
    )
    p.add_argument(
        "--steps", type=int, default=0, help="optimizer steps per repeat (0 = per-config default)"
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time ours under torch.compile (and its compile time)",
    )
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    quiet_transformers()
    load_before = os.getloadavg()[0]
    device = pick_device(args.device)
    peak = matmul_flops(device)
    results = [bench_config(name, args, device) for name in args.configs.split(",")]
    peak = max(peak, matmul_flops(device))  # best of before and after: load only lowers it
    sides = ["ours", "transformers"] + (["compiled"] if args.compile else [])
    for r in results:
        for side in sides:
            r[f"{side}_mfu"] = r["flops_per_token"] * r[f"{side}_tok_s"] / peak

    print(
        f"matmul peak {peak / 1e9:.1f} GFLOP/s, {torch.get_num_threads()} threads, {device}, "
        f"load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after"
    )
    header = [
        "config",
        "params",
        "B x T",
        "ours tok/s",
        "HF tok/s",
        "ours/HF",
        "ours MFU",
        "HF MFU",
    ]
    rows = [
        [
            r["config"],
            f"{r['params'] / 1e6:.2f}M",
            f"{r['batch']}x{r['seq_len']}",
            r["ours_tok_s"],
            r["transformers_tok_s"],
            f"{r['ratio']:.2f}x",
            f"{100 * r['ours_mfu']:.1f}%",
            f"{100 * r['transformers_mfu']:.1f}%",
        ]
        for r in results
    ]
    if args.compile:
        header += ["compiled tok/s", "compiled/HF", "compiled MFU", "compile s"]
        for row, r in zip(rows, results):
            row += [
                r["compiled_tok_s"],
                f"{r['compiled_tok_s'] / r['transformers_tok_s']:.2f}x",
                f"{100 * r['compiled_mfu']:.1f}%",
                f"{r['compile_s']:.0f}",
            ]
    print_table(header, rows)
    print_json(
        "train_throughput", environment(device, torch.float32), peak_flops=peak, results=results
    )


if __name__ == "__main__":
    main()
