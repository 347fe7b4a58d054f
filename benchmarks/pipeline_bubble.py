"""The pipeline bubble, measured: each stage's idle fraction against (S - 1) / (M + S - 1).

Runs itself under torchrun with S processes (one stage each, gloo on CPU, 1 thread each). For
every schedule (GPipe, 1F1B) and number of micro-batches M, it times --steps pipeline steps of
a block-heavy GPT (a small vocabulary, so the embedding and output head add little to the first
and last stage) on made-up random tokens, with a fixed micro-batch size so that one
micro-batch's work stays the same as M grows. A stage's busy time is the seconds spent inside
its forward and backward passes (PipelineStage.forward_one_chunk / backward_one_chunk, and
the loss on the last stage); idle
= 1 - busy / step wall time, the step wall time taken after a barrier (all stages start
together). The formula assumes equal stages and free communication; measured idle also holds
the sends and receives and the stages' imbalance.

    OMP_NUM_THREADS=1 python benchmarks/pipeline_bubble.py --stages 2 --steps 6
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, print_json, print_table  # noqa: E402

from lmforge.config import DistConfig, ModelConfig  # noqa: E402
from lmforge.model.transformer import GPT  # noqa: E402
from lmforge.train import dist  # noqa: E402
from lmforge.train.pipeline import Pipeline, bubble  # noqa: E402


def measure(args, schedule: str, m: int, info) -> tuple[float, float]:
    """(mean step seconds, busy fraction) of this rank's stage over args.steps steps."""
    cfg = ModelConfig(
        dim=args.dim, n_layer=args.layers, n_head=4, max_seq_len=args.seq, vocab_size=256
    )
    torch.manual_seed(0)
    model = GPT(cfg)
    dist_cfg = DistConfig(pp=info.pp, pp_schedule=schedule, pp_microbatches=m)
    rows = m * args.micro
    pipe = Pipeline(model, dist_cfg, info, torch.device("cpu"), rows, 1)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (rows, args.seq), generator=g)  # made-up tokens
    y = torch.randint(0, 256, (rows, args.seq), generator=g)
    pipe.forward_backward(x, y)  # the first step infers shapes and warms up: not timed
    wall = busy = 0.0
    for _ in range(args.steps):
        dist.barrier(info)
        pipe.busy_s, start = 0.0, time.perf_counter()
        pipe.forward_backward(x, y)
        wall += time.perf_counter() - start
        busy += pipe.busy_s
        model.zero_grad(set_to_none=True)
    return wall / args.steps, busy / wall


def worker(args) -> None:
    """One stage: every (schedule, M) in turn; rank 0 prints the table."""
    torch.set_num_threads(1)
    info = dist.setup(DistConfig(pp=args.stages))
    S, rows = info.pp, []
    for schedule in ("gpipe", "1f1b"):
        for m in args.microbatches:
            if schedule == "1f1b" and m < S:  # PyTorch's 1F1B needs M >= S
                continue
            step_s, busy = measure(args, schedule, m, info)
            per_stage = dist.gather((step_s, busy), info)
            idle = [1 - b for _, b in per_stage]
            rows.append(
                [schedule, m, round(per_stage[0][0], 3)]
                + [round(i, 3) for i in idle]
                + [round(bubble(S, m), 3)]
            )
    if info.is_main:
        header = ["schedule", "M", "step s"] + [f"idle s{s}" for s in range(S)] + ["(S-1)/(M+S-1)"]
        print_table(header, rows)
        print_json(
            "pipeline_bubble",
            environment(torch.device("cpu"), torch.float32),
            stages=S,
            steps=args.steps,
            micro_rows=args.micro,
            model={"dim": args.dim, "n_layer": args.layers, "seq": args.seq},
            rows=rows,
        )
    dist.teardown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--microbatches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--micro", type=int, default=2, help="rows per micro-batch")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    cli = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.stages}"]
    cli += [__file__, *sys.argv[1:], "--worker"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sys.exit(subprocess.run([sys.executable, *cli], env=env).returncode)


if __name__ == "__main__":
    main()
