"""What output moderation costs and catches in `lmforge serve`, on SmolLM2-135M-Instruct.

The regime: the same server (SmolLM2, greedy, max_tokens as given) run twice over HTTP with the
official openai client: without moderation, then with `--moderation out` (input screening off,
so every prompt reaches the model and only the answers are screened). Prompts: XSTest's unsafe
prompts (the answers a deployment wants cut) and its safe ones (answers that should pass),
the first N of each, never trained on. Printed per run: tokens/s of the answers (sum of
completion tokens / sum of wall time, requests one at a time), and with moderation the share
of answers cut (finish_reason content_filter) per side. Whether a cut answer was in fact
harmful is not judged here: the unsafe side's cut rate is the share of harmful requests whose
answer the head flagged, the safe side's is the false-cut rate.

    OMP_NUM_THREADS=2 python benchmarks/moderation_serve.py --moderation-model runs/moderation --n 20
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def run(url: str, name: str, prompts: list[str], max_tokens: int) -> tuple[float, list[str]]:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    tokens, seconds, finishes = 0, 0.0, []
    for p in prompts:
        t = time.perf_counter()
        r = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": p}], max_tokens=max_tokens,
            temperature=0,
        )  # fmt: skip
        seconds += time.perf_counter() - t
        tokens += r.usage.completion_tokens
        finishes.append(r.choices[0].finish_reason)
    return tokens / seconds, finishes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model", default=str(Path.home() / ".cache/lmforge/models/smollm2-135m-instruct")
    )
    ap.add_argument(
        "--moderation-model", required=True, help="a `lmforge moderate train` directory"
    )
    ap.add_argument("--n", type=int, default=20, help="prompts per side (default: 20)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--every", type=int, default=100, help="--moderation-every (default: 100)")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "tests" / "serve"))
    from conftest import _live_server  # the tests' uvicorn-in-a-thread server

    from lmforge.safety.moderation import load_xstest
    from lmforge.serve.app import create_app
    from lmforge.serve.moderation import Policy

    xs = load_xstest()
    sides = {s: [r["text"] for r in xs if r["label"] == s][: args.n] for s in ("unsafe", "safe")}
    print(f"torch threads {torch.get_num_threads()}, {args.n} prompts a side, "
          f"max_tokens {args.max_tokens}, check every {args.every} characters")  # fmt: skip
    speeds: dict[str, list[float]] = {"plain": [], "moderated": []}
    for label in ("plain", "moderated"):
        policy = None
        if label == "moderated":
            policy = Policy(args.moderation_model, screen_in=False, every=args.every)
        app = create_app(args.model, max_batch=1, max_tokens=args.max_tokens, moderation=policy)
        with _live_server(app) as url:
            name = Path(args.model).resolve().name
            for side, prompts in sides.items():
                speed, finishes = run(url, name, prompts, args.max_tokens)
                speeds[label].append(speed)
                cut = finishes.count("content_filter")
                print(f"{label:9s} {side:6s}: {speed:6.1f} tokens/s, answers cut {cut}/{len(prompts)}",
                      flush=True)  # fmt: skip
    # the safe side: answers that run their length either way (cut ones end early)
    print(
        f"moderated / plain tokens/s on the safe side: {speeds['moderated'][1] / speeds['plain'][1]:.2f}"
    )


if __name__ == "__main__":
    main()
