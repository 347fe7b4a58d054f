"""Pretraining on one machine with several processes (torchrun over gloo): throughput and memory.

Throughput (the default): 1 process x N threads against N processes x 1 thread, with DDP and
with FSDP2, on the same global batch. On a CPU the question is whether data parallelism beats
intra-op threading: N processes each run whole matmuls on one core with no thread
synchronisation inside an op, but pay an all-reduce of every gradient per step (DDP), or an
all-gather of every block's weights and a reduce-scatter of its gradients (FSDP2). The ratios
printed are tokens/s over single-process tokens/s; every figure is read from the run's summary
(median of logged intervals), and the table holds the median over --repeats runs.

Memory (--memory): a few steps of a larger model (default dim 1024, 16 layers, 16 heads: 211M
parameters, 2 sequences of 64 tokens per rank) with 1 process, N DDP processes and N FSDP2
processes (with and without activation checkpointing). Each rank's peak resident set size sits
beside the analytic training state per rank: 16 bytes per parameter (fp32 weights 4, gradients
4, AdamW moments 8) for one process and for DDP, 16/N for FSDP2 plus one block's gathered
weights. A peak is the high-water mark of the whole run, so it holds what a process that
imports torch and lmforge and builds nothing already occupies (the baseline, measured and
printed: subtract it). Under FSDP2 no rank ever holds the whole model: it is built on the meta
device, sharded, and each rank draws and keeps only its own slices.

    python benchmarks/distributed.py --run runs/tiny --steps 40 --repeats 2
    python benchmarks/distributed.py --run runs/tiny --memory
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, median, print_json, print_table  # noqa: E402

from lmforge.config import ModelConfig  # noqa: E402
from lmforge.model.transformer import GPT  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DDP = ["--dist.strategy", "ddp"]
FSDP = ["--dist.strategy", "fsdp"]
CHECKPOINTING = ["--dist.activation_checkpointing", "true"]


def train(args, out: Path, nproc: int, threads: int, opts: list[str]) -> dict:
    """One `lmforge pretrain` run, under torchrun when nproc > 1; its summary."""
    run = Path(args.run)
    cli = ["-m", "lmforge", "pretrain", "--config", args.recipe, "--device", "cpu"]
    cli += ["--data-dir", str(run / "data"), "--tokenizer-dir", str(run / "tokenizer")]
    cli += ["--out", str(out), "--eval_every", "0", "--save_every", "0", "--eval_tokens", "256"]
    cli += ["--threads", str(threads), *opts]
    if nproc > 1:
        cli = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + cli
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run([sys.executable, *cli], cwd=REPO, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return json.loads((out / "pretrain" / "summary.json").read_text())


def throughput(args, tmp: Path) -> None:
    """Tokens/s of 1 process x N threads, N DDP processes and N FSDP2 processes x 1 thread."""
    n = args.nproc
    setups = {
        "single": (f"1 process x {n} threads", 1, n, []),
        "ddp": (f"{n} processes x 1 thread (DDP)", n, 1, DDP),
        "fsdp": (f"{n} processes x 1 thread (FSDP2)", n, 1, FSDP),
    }
    runs = {key: [] for key in setups}
    for rep in range(args.repeats):
        for key, (_, nproc, threads, dist_opts) in setups.items():
            opts = ["--max_steps", str(args.steps), "--log_every", "5", "--seq_len"]
            opts += [str(args.seq_len), "--batch_size", str(args.batch_size // nproc), *dist_opts]
            s = train(args, tmp / f"{key}{rep}", nproc, threads, opts)
            runs[key].append(round(s["tokens_per_s"]))
    tps = {key: median(xs) for key, xs in runs.items()}
    print(
        f"model: {s['params'] / 1e6:.1f}M parameters; global batch {args.batch_size} x "
        f"{args.seq_len} tokens, {args.steps} steps; median of {args.repeats} runs"
    )
    print_table(
        ["setup", "tokens/s (median)", "runs"],
        [[label, float(tps[k]), runs[k]] for k, (label, *_) in setups.items()],
    )
    print(f"DDP / single process: {tps['ddp'] / tps['single']:.2f}x")
    print(f"FSDP2 / single process: {tps['fsdp'] / tps['single']:.2f}x")
    print_json(
        "distributed",
        environment(torch.device("cpu"), torch.float32),
        nproc=n,
        global_batch=args.batch_size,
        seq_len=args.seq_len,
        steps=args.steps,
        single_tokens_s=tps["single"],
        ddp_tokens_s=tps["ddp"],
        fsdp_tokens_s=tps["fsdp"],
        ddp_ratio=tps["ddp"] / tps["single"],
        fsdp_ratio=tps["fsdp"] / tps["single"],
    )


def baseline_rss_mb() -> float:
    """Peak RSS of a process that imports torch and the pretraining code and builds nothing."""
    code = "import resource, lmforge.cli, lmforge.train.pretrain; "
    code += "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    return float(r.stdout)


def block_params(model: dict) -> int:
    """Parameters of one Transformer block (what FSDP2 gathers at a time), built on no memory."""
    with torch.device("meta"):
        return sum(p.numel() for p in GPT(ModelConfig(**model)).layers[0].parameters())


def state_mb(summary: dict) -> float:
    """Analytic fp32 training state per rank: 16 B/param, sharded over the ranks under FSDP2."""
    n, params = summary["world_size"], summary["params"]
    if summary["strategy"] != "fsdp":
        return 16 * params / 2**20
    return (16 * params / n + 4 * block_params(summary["model"])) / 2**20


def memory(args, tmp: Path) -> None:
    """Per-rank peak RSS of a few steps of a large model, beside the analytic training state."""
    n = args.nproc
    setups = {
        "single": (f"1 process x {n} threads", 1, n, []),
        "ddp": (f"{n} processes (DDP)", n, 1, DDP),
        "fsdp": (f"{n} processes (FSDP2)", n, 1, FSDP),
        "fsdp_ac": (f"{n} processes (FSDP2 + act. ckpt)", n, 1, FSDP + CHECKPOINTING),
    }
    model = ["--model.dim", str(args.dim), "--model.n_layer", str(args.n_layer)]
    model += ["--model.n_head", str(args.n_head), "--model.n_kv_head", str(args.n_head)]
    base = baseline_rss_mb()
    rows, peaks, states = [], {}, {}
    for key, (label, nproc, threads, dist_opts) in setups.items():
        opts = ["--max_steps", str(args.memory_steps), "--log_every", "1", "--seq_len", "64"]
        opts += ["--batch_size", str(args.memory_batch), *model, *dist_opts]
        s = train(args, tmp / key, nproc, threads, opts)
        peaks[key], states[key] = s["peak_memory_mb"], state_mb(s)
        for rank, peak in enumerate(peaks[key]):
            rows.append([label, rank, peak, peak - base, states[key]])
    params = s["params"]
    print(
        f"model: dim {args.dim}, {args.n_layer} layers, {args.n_head} heads, {params / 1e6:.0f}M "
        f"parameters; {args.memory_steps} steps of {args.memory_batch} x 64 tokens per rank"
    )
    print(f"baseline (import torch + lmforge, build nothing): {base:,.0f} MiB")
    print_table(["setup", "rank", "peak RSS MiB", "minus baseline", "analytic state MiB"], rows)
    print("analytic: 16 B/param (1 process, DDP); FSDP2 16/N B/param + one block's weights")
    print("peaks are high-water marks of the whole process: subtract the baseline")
    print_json(
        "distributed_memory",
        environment(torch.device("cpu"), torch.float32),
        nproc=n,
        dim=args.dim,
        n_layer=args.n_layer,
        n_head=args.n_head,
        params=params,
        steps=args.memory_steps,
        batch_per_rank=args.memory_batch,
        seq_len=64,
        baseline_rss_mb=base,
        peak_rss_mb=peaks,
        analytic_state_mb=states,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a run directory with data/ and tokenizer/")
    ap.add_argument("--recipe", default=str(REPO / "recipes/tiny-cpu.yaml"))
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16, help="global sequences per step")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--memory", action="store_true", help="measure peak memory instead")
    ap.add_argument("--dim", type=int, default=1024, help="--memory: model width")
    ap.add_argument("--n-layer", type=int, default=16, help="--memory: Transformer blocks")
    ap.add_argument("--n-head", type=int, default=16, help="--memory: attention heads")
    ap.add_argument("--memory-steps", type=int, default=3)
    ap.add_argument("--memory-batch", type=int, default=2, help="--memory: sequences per rank")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        (memory if args.memory else throughput)(args, Path(tmp))


if __name__ == "__main__":
    main()
