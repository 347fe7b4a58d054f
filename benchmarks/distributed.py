"""Pretraining throughput on one machine: 1 process x N threads against N processes x 1 thread
(torchrun, DDP over gloo), on the same global batch.

On a CPU the question is whether data parallelism beats intra-op threading: N processes each run
whole matmuls on one core with no thread synchronisation inside an op, but pay an all-reduce of
every gradient per step. The ratio printed is DDP tokens/s over single-process tokens/s; both
read their figure from the run's summary (median of logged intervals).

    python benchmarks/distributed.py --run runs/tiny --steps 40 --repeats 2
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

REPO = Path(__file__).resolve().parents[1]


def train(run: Path, out: Path, nproc: int, threads: int, args) -> dict:
    cli = ["-m", "lmforge", "pretrain", "--config", args.recipe, "--device", "cpu"]
    cli += ["--data-dir", str(run / "data"), "--tokenizer-dir", str(run / "tokenizer")]
    cli += ["--out", str(out), "--max_steps", str(args.steps), "--eval_every", "0"]
    cli += ["--save_every", "0", "--log_every", "5", "--eval_tokens", "256"]
    cli += ["--batch_size", str(args.batch_size // nproc), "--seq_len", str(args.seq_len)]
    if nproc > 1:
        cli = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + cli
        cli += ["--dist.strategy", "ddp"]
    else:
        cli += ["--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run([sys.executable, *cli], cwd=REPO, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return json.loads((out / "pretrain" / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a run directory with data/ and tokenizer/")
    ap.add_argument("--recipe", default=str(REPO / "recipes/tiny-cpu.yaml"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16, help="global sequences per step")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    run = Path(args.run)

    results = {"single": [], "ddp": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            s = train(run, Path(tmp) / f"single{rep}", 1, args.nproc, args)
            results["single"].append(s["tokens_per_s"])
            s = train(run, Path(tmp) / f"ddp{rep}", args.nproc, 1, args)
            results["ddp"].append(s["tokens_per_s"])
    single, ddp = median(results["single"]), median(results["ddp"])
    print_table(
        ["setup", "tokens/s (median)", "runs"],
        [
            [f"1 process x {args.nproc} threads", single, results["single"]],
            [f"{args.nproc} processes x 1 thread (DDP)", ddp, results["ddp"]],
        ],
    )
    print(f"DDP / single process: {ddp / single:.2f}x")
    print_json(
        "distributed",
        environment(torch.device("cpu"), torch.float32),
        nproc=args.nproc,
        global_batch=args.batch_size,
        seq_len=args.seq_len,
        single_tokens_s=single,
        ddp_tokens_s=ddp,
        ratio=ddp / single,
    )


if __name__ == "__main__":
    main()
