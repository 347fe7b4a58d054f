"""How well does the moderation head flag harmful / offensive text, beside the word list?

The regime: `lmforge moderate train` on the bundled sources (lmforge/safety/moderation.py: 70%
train, 10% val for the threshold, 20% held-out by a seeded text hash), once per encoder; then
precision / recall / F1 per language on the held-out part and the share of XSTest's 250 safe
prompts (over-refusal) and 200 unsafe prompts flagged, for the classifier and for the word list
of lmforge/data/toxicity.py at `clean`'s default cut (0.5). Sentence vectors are cached under
LMFORGE_CACHE/moderation, so a second run costs only the head's training. The tables go in
docs/safety.md.

    OMP_NUM_THREADS=1 python benchmarks/moderation.py --encoders smollm2-135m-instruct,all-minilm-l6-v2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from lmforge.safety.moderation import config_from, train
from lmforge.safety.run import format_report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoders", default="smollm2-135m-instruct", help="comma-separated")
    ap.add_argument("--steps", type=int, default=None, help="head steps (default: the config's)")
    ap.add_argument("--json", help="also write the reports to this file")
    args = ap.parse_args()
    print(f"torch threads {torch.get_num_threads()}")
    reports = {}
    for enc in args.encoders.split(","):
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            rep = train(config_from(args.steps, enc), out)["report"]
        print(f"\n## encoder {enc} ({time.perf_counter() - t0:.0f} s incl. embedding)\n")
        print(format_report(rep), flush=True)
        reports[enc] = rep
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(reports, f, indent=2)


if __name__ == "__main__":
    main()
