"""Does a small chat model solve more GSM8K problems when it may call a calculator or run Python?

The regime: the first N problems of the GSM8K test set (datasets/eval/gsm8k/test.jsonl.gz,
default N = 50), zero-shot, greedy, SmolLM2-135M-Instruct on the CPU, through `lmforge agent`'s
loop (lmforge/agent/loop.py). Each setting answers every problem; a problem is right when the
final text answer's number (tasks/gsm8k.py `extract_answer`: after "answer is", else the last
number) equals the reference. A run that hits the step limit has no text answer and counts as
wrong. Settings: no tools (one plain chat step), and each tool with `--tool-choice auto` (the
model may call it) and `required-first` (the first step is forced to be a call, its arguments
constrained by the tool's schema; needs llguidance). Reported: accuracy, mean steps (model
generations), the share of problems with at least one tool call, the share of calls that failed
(bad arguments, the tool raising) and seconds per problem. The table goes in docs/agents.md.

    OMP_NUM_THREADS=1 python benchmarks/agent_gsm8k.py --n 50
    python benchmarks/agent_gsm8k.py --settings none,calculator:required-first --n 10
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, print_json, print_table  # noqa: E402

from lmforge.agent.loop import model_reply, run_agent  # noqa: E402
from lmforge.agent.tools import build_tools  # noqa: E402
from lmforge.model.load import load  # noqa: E402
from lmforge.tasks.gsm8k import extract_answer, read_gsm8k  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = Path("~/.cache/lmforge/models/smollm2-135m-instruct").expanduser()
SETTINGS = "none,calculator:required-first,python:required-first,calculator:auto,python:auto"
SYSTEM = (
    "Solve the math word problem step by step. {tools}"
    "End your reply with 'The answer is N.' where N is a number."
)
TOOL_HINT = "Use the {name} tool for arithmetic; after its result, give the final answer. "


def run_setting(model, tok, problems, setting: str, args, log) -> dict:
    """Answer every problem with one setting ("none", or "TOOL:CHOICE"); the setting's row."""
    name, _, choice = setting.partition(":")
    tools = [] if name == "none" else build_tools([name])
    system = SYSTEM.format(tools=TOOL_HINT.format(name=name) if tools else "")
    reply = model_reply(model, tok, args.max_new_tokens, temperature=0.0)
    right = steps = called = calls = failed = 0
    t0 = time.perf_counter()
    for i, (line, question, reference) in enumerate(problems, 1):
        r = run_agent(reply, question, tools, args.max_steps, choice or "auto", system)
        got = extract_answer(r.answer) if r.answer else None
        right += got == reference
        steps += r.steps
        tool_rows = [e for e in r.transcript if e["role"] == "tool"]
        called += bool(tool_rows)
        calls += len(tool_rows)
        failed += sum(e["error"] for e in tool_rows)
        if args.transcripts:
            row = {
                "setting": setting,
                "line": line,
                "reference": reference,
                "got": got,
                **r.as_dict(),
            }
            log.write(json.dumps(row, ensure_ascii=False) + "\n")
            log.flush()
        print(f"[{setting}] {i}/{len(problems)} right {right} ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)  # fmt: skip
    n = len(problems)
    return {
        "setting": setting,
        "accuracy": right / n,
        "right": right,
        "mean_steps": steps / n,
        "called_share": called / n,
        "failed_calls": failed / calls if calls else 0.0,
        "s_per_problem": (time.perf_counter() - t0) / n,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--data", default=str(ROOT / "datasets/eval/gsm8k/test.jsonl.gz"))
    ap.add_argument("--n", type=int, default=50, help="the first N test problems")
    ap.add_argument("--settings", default=SETTINGS, help="comma-separated: none, TOOL:CHOICE")
    ap.add_argument("--max-steps", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--transcripts", help="write every run's transcript here (JSONL)")
    args = ap.parse_args()

    problems = read_gsm8k(Path(args.data))[: args.n]
    model, tok = load(args.model)
    log = open(args.transcripts, "w", encoding="utf-8") if args.transcripts else None
    rows = []
    for setting in args.settings.split(","):
        rows.append(run_setting(model, tok, problems, setting, args, log))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # partial results survive a kill
    header = [
        "setting",
        "accuracy",
        "right",
        "mean steps",
        "with a call",
        "failed calls",
        "s/problem",
    ]
    print(f"GSM8K test, first {len(problems)} problems, {Path(args.model).name}, greedy, "
          f"max {args.max_steps} steps, {args.max_new_tokens} new tokens a step")  # fmt: skip
    print_table(header, [list(r.values()) for r in rows])
    env = environment(torch.device("cpu"), torch.float32)
    print_json("agent_gsm8k", env, n=len(problems), max_steps=args.max_steps, rows=rows)


if __name__ == "__main__":
    main()
