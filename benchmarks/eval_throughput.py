"""Multiple-choice scoring speed: batched vs one request at a time, same model, same questions.

Regime: scoring a benchmark like MMLU on a CPU, where each question turns into four
(context, continuation) log-likelihood requests that share a long few-shot context. Batching
pads requests of similar length together and runs them in one forward; sharing the context runs
a question's context once and reads every one-token answer off its last position. All settings
must give the same accuracy (the script checks it); the table reports questions per second.

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
from lmforge.model.load import load


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="runs/tiny/sft/model", help="model directory")
    p.add_argument("--task", default="mmlu", help="multiple-choice task (lmforge/tasks)")
    p.add_argument("--limit", type=int, default=60, help="questions scored per run")
    p.add_argument("--batch-size", type=int, default=16, help="requests per forward, batched")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting (median)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load(args.model)
    settings = {  # name: (batch size, share the context among a question's choices)
        "one request at a time": (1, False),
        f"batches of {args.batch_size}": (args.batch_size, False),
        f"batches of {args.batch_size}, shared context": (args.batch_size, True),
    }
    results, times = {}, {name: [] for name in settings}
    for r in range(args.repeats + 1):  # the first round warms up and is not timed
        for name in list(settings) if r % 2 else list(settings)[::-1]:
            bs, share = settings[name]
            t = time.perf_counter()
            results[name] = evaluate_mc(
                model, tok, args.task, limit=args.limit, batch_size=bs, share_context=share
            )
            if r:
                times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    base = "one request at a time"
    n = results[base]["n"]
    print(f"{args.task}, {n} questions, {args.threads} threads, model {args.model}")
    print(f"{'setting':>34}  {'questions/s':>11}  {'vs one at a time':>16}  {'accuracy':>8}")
    for name in settings:
        print(
            f"{name:>34}  {n / med[name]:>11.1f}  {med[base] / med[name]:>15.2f}x"
            f"  {results[name]['acc']:>8.3f}"
        )
    same = len({round(res["acc"], 12) for res in results.values()}) == 1
    print(f"same accuracy in every setting: {'yes' if same else 'NO'}")
    print(json.dumps({"bench": "eval_throughput", "task": args.task, "n": n, "seconds": med}))


if __name__ == "__main__":
    main()
