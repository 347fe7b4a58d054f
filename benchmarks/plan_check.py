"""Does `lmforge plan`'s compute-optimal size hold on our own data? Three model sizes trained at
one compute budget on the tiny recipe's prepared data, and where the measured optimum falls
beside the fits' predictions.

The regime: budget C FLOPs in the 6 N D convention (N = every parameter, tied embedding once,
as lmforge/plan.py counts); each size gets D = C / (6 N) tokens, i.e. D / (batch x seq_len)
steps of `lmforge pretrain` with the tiny recipe's settings (batch 16 x 256, lr 2e-3 cosine,
warmup 30 or a tenth of the steps) and head width 64; the figure is the final validation bits
per byte in English and Chinese (the recipe's held-out shards). One seed, no learning-rate
tuning per size: read the ranking, not the decimals.

    OMP_NUM_THREADS=1 python benchmarks/plan_check.py --data runs/tiny/data \
        --tokenizer runs/tiny/tokenizer --flops 5e12
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lmforge.plan import FITS, count_params

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(1, 64), (2, 128), (4, 192)]  # (n_layer, dim): head width 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT / "runs/tiny/data"))
    ap.add_argument("--tokenizer", default=str(ROOT / "runs/tiny/tokenizer"))
    ap.add_argument("--flops", type=float, default=5e12)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    vocab = json.loads((Path(args.data) / "manifest.json").read_text())["vocab_size"]
    for name, fit in FITS.items():
        n, d = fit.optimum(args.flops)
        print(f"fit {name}: N_opt {n / 1e6:.2f} M, D_opt {d / 1e6:.1f} M tokens")
    rows = []
    for n_layer, dim in SIZES:
        n = count_params(n_layer, dim, vocab)
        tokens = args.flops / (6 * n)
        steps = max(1, round(tokens / (args.batch * args.seq_len)))
        with tempfile.TemporaryDirectory() as out:
            t = time.perf_counter()
            cmd = [sys.executable, "-m", "lmforge", "pretrain", "--config",
                   str(ROOT / "recipes/tiny-cpu.yaml"), "--data-dir", args.data, "--tokenizer-dir",
                   args.tokenizer, "--out", out, "--max_steps", str(steps), "--batch_size",
                   str(args.batch), "--seq_len", str(args.seq_len), "--eval_every", str(steps),
                   "--save_every", str(steps), "--warmup_steps", str(min(30, max(1, steps // 10))),
                   "--model.dim", str(dim), "--model.n_layer", str(n_layer), "--model.n_head",
                   str(dim // 64), "--model.n_kv_head", str(dim // 64), "--threads", "1"]  # fmt: skip
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            seconds = time.perf_counter() - t
            lines = (Path(out) / "pretrain" / "metrics.jsonl").read_text().splitlines()
            last = [json.loads(x) for x in lines if "val_en_bpb" in x][-1]
        rows.append(
            (n_layer, dim, n, steps, tokens, last["val_en_bpb"], last["val_zh_bpb"], seconds)
        )
        print(f"{n_layer} x {dim}: {n / 1e6:.2f} M params, {steps} steps ({tokens / 1e6:.2f} M "
              f"tokens), val bpb en {last['val_en_bpb']:.3f} zh {last['val_zh_bpb']:.3f}, "
              f"{seconds:.0f} s", flush=True)  # fmt: skip
    best = min(rows, key=lambda r: r[5] + r[6])
    print(f"measured optimum (lowest en + zh bpb): {best[0]} x {best[1]}, {best[2] / 1e6:.2f} M")


if __name__ == "__main__":
    main()
