"""Multiple-choice scoring speed: batched vs one request at a time, same model, same questions.

Regime: scoring a benchmark like MMLU on a CPU, where each question turns into four
(context, continuation) log-likelihood requests that share a long few-shot context. Batching
pads requests of similar length together and runs them in one forward. Both settings must give
the same accuracy (the script checks it); the table reports examples (questions) per second.

    python benchmarks/eval_throughput.py --model runs/tiny/sft/model
    python benchmarks/eval_throughput.py --model DIR --task cmmlu --limit 100 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lmforge.eval.multiple_choice import evaluate_mc
from lmforge.infer.chat import load_for_inference


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="runs/tiny/sft/model", help="model directory")
    p.add_argument("--task", default="mmlu", help="multiple-choice task (lmforge/eval/tasks)")
    p.add_argument("--limit", type=int, default=60, help="questions scored per run")
    p.add_argument("--batch-size", type=int, default=16, help="requests per forward, batched")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting (median)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_for_inference(args.model)
    results, times = {}, {1: [], args.batch_size: []}
    for r in range(args.repeats + 1):  # the first round warms up and is not timed
        for bs in (1, args.batch_size) if r % 2 else (args.batch_size, 1):
            t = time.perf_counter()
            results[bs] = evaluate_mc(model, tok, args.task, limit=args.limit, batch_size=bs)
            if r:
                times[bs].append(time.perf_counter() - t)
    one, many = (statistics.median(times[b]) for b in (1, args.batch_size))
    n = results[1]["n"]
    same = results[1]["acc"] == results[args.batch_size]["acc"]
    print(f"{args.task}, {n} questions, {args.threads} threads, model {args.model}")
    print(f"{'setting':>22}  {'examples/s':>10}  {'accuracy':>8}")
    print(f"{'one request at a time':>22}  {n / one:>10.1f}  {results[1]['acc']:>8.3f}")
    print(
        f"{f'batches of {args.batch_size}':>22}  {n / many:>10.1f}  {results[args.batch_size]['acc']:>8.3f}"
    )
    print(f"batched / one at a time: {one / many:.2f}x; same accuracy: {'yes' if same else 'NO'}")
    print(json.dumps({"bench": "eval_throughput", "task": args.task, "n": n,
                      "one_s": one, "batched_s": many, "speedup": one / many, "same": same}))  # fmt: skip


if __name__ == "__main__":
    main()
