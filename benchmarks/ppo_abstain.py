"""Does PPO's qa reward (correct > "I don't know" > wrong) teach a chat model to abstain when the
passage does not answer? Builds the PPO prompt files from SQuAD v2 and scores a model on the
held-out questions, greedy, the same way before and after PPO.

Data: the SQuAD v2 dev questions bundled in datasets/rag/qa with their own passage
(datasets/rag/docs). A prompt is the passage and the question with an instruction to answer in a
few words or say "I don't know"; the reference is the shortest gold answer (qa_check credits an
answer that contains it), or UNANSWERABLE for a question the passage does not answer (there an
abstention is the correct reply). Train and held-out questions come from different articles,
so no passage is seen in both.

    python benchmarks/ppo_abstain.py build --out runs/ppo-abstain/data
    python benchmarks/ppo_abstain.py eval --model MODEL --prompts runs/ppo-abstain/data/eval.jsonl \\
        --log runs/ppo-abstain/eval_base.jsonl

`build` writes train.jsonl (every question of the training articles) and eval.jsonl (--per_class
answerable and as many unanswerable questions of the held-out article, interleaved). `eval`
prints a table and one JSON line: on answerable questions the share correct, abstained
(over-abstention) and wrong; on unanswerable ones the share abstained (the right reply); every
answer goes to --log, and `eval --rescore LOG` grades a log again without the model.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, print_json, print_table  # noqa: E402

from lmforge.tasks.qa import UNANSWERABLE, qa_check  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QA = ROOT / "datasets/rag/qa/squad_v2_dev_qa.jsonl.gz"
PASSAGES = ROOT / "datasets/rag/docs/squad_passages.jsonl.gz"
INSTRUCTION = (
    "Answer the question from the passage in a few words. If the passage does not contain "
    "the answer, reply: I don't know."
)


def prompt_row(row: dict, passage: dict) -> dict:
    """One SQuAD v2 question -> a PPO qa row: question (the prompt), answer (the reference), and
    `answerable` for the evaluation's split (ppo ignores it)."""
    question = f"{INSTRUCTION}\n\nPassage: {passage['text']}\n\nQuestion: {row['question']}"
    golds = sorted({a["text"].strip() for a in row["answers"]}, key=len)
    if not row["is_impossible"] and not golds:
        raise ValueError(f"question {row['id']}: answerable but has no gold answer")
    answer = UNANSWERABLE if row["is_impossible"] else golds[0]
    return {"id": row["id"], "title": row["title"], "question": question, "answer": answer,
            "answerable": not row["is_impossible"]}  # fmt: skip


def split_rows(rows: list[dict], held_out_title: str, per_class: int) -> tuple[list, list]:
    """(train, eval): train = every row of the other articles; eval = the held-out article's
    first per_class answerable and per_class unanswerable rows, interleaved."""
    train = [r for r in rows if r["title"] != held_out_title]
    held = [r for r in rows if r["title"] == held_out_title]
    ans = [r for r in held if r["answerable"]][:per_class]
    una = [r for r in held if not r["answerable"]][:per_class]
    if not held or min(len(ans), len(una)) < per_class:
        raise SystemExit(
            f"--held_out {held_out_title!r}: {len(ans)} answerable and {len(una)} unanswerable "
            f"questions, fewer than --per_class {per_class}"
        )
    return train, [r for pair in zip(ans, una) for r in pair]


def build(args) -> None:
    passages = {d["id"]: d for d in map(json.loads, gzip.open(PASSAGES, "rt"))}
    rows = [prompt_row(r, passages[r["passage_id"]]) for r in map(json.loads, gzip.open(QA, "rt"))]
    train, evals = split_rows(rows, args.held_out, args.per_class)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("eval", evals)):
        with open(out / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
        n_ans = sum(r["answerable"] for r in part)
        titles = sorted({r["title"] for r in part})
        print(f"{out / name}.jsonl: {len(part)} questions ({n_ans} answerable) from {titles}")


def score(rows: list[dict], answers: list[str]) -> dict:
    """The figures of one evaluation: on answerable rows the share correct / abstained / wrong,
    on unanswerable rows the share abstained (qa_check's "correct" there) / answered."""
    out = {}
    for answerable, name in ((True, "answerable"), (False, "unanswerable")):
        got = [
            qa_check(a, r["answer"]) for r, a in zip(rows, answers) if r["answerable"] == answerable
        ]
        n = max(len(got), 1)
        if answerable:
            out |= {f"{name}_{k}": got.count(k) / n for k in ("correct", "abstain", "wrong")}
        else:
            out |= {
                f"{name}_abstain": got.count("correct") / n,
                f"{name}_wrong": got.count("wrong") / n,
            }
        out[f"n_{name}"] = len(got)
    return out


def rescore(args) -> None:
    """The figures of a logged evaluation, graded again (after a change to qa_check)."""
    logged = [json.loads(x) for x in open(args.rescore)]
    rows = [{"answer": r["reference"], "answerable": r["answerable"]} for r in logged]
    figures = score(rows, [r["answer"] for r in logged])
    print_table(["figure", "value"], [[k, v] for k, v in figures.items()])
    print(json.dumps({"bench": "ppo_abstain", "log": args.rescore, "n": len(rows), **figures}))


def evaluate(args) -> None:
    if args.rescore:
        return rescore(args)
    import torch

    from lmforge.align.preference import prompt_ids
    from lmforge.align.rollout import sample_answers
    from lmforge.infer.chat import stop_ids
    from lmforge.infer.cpu_decode import relayout
    from lmforge.model.load import load

    torch.set_num_threads(args.threads)
    rows = [json.loads(x) for x in open(args.prompts)][: args.limit or None]
    model, tok = load(args.model, device="cpu")
    relayout(model)
    stops = stop_ids(tok)
    t = time.perf_counter()
    ids = [prompt_ids(tok, [{"role": "user", "content": r["question"]}]) for r in rows]
    out = sample_answers(model, ids, 1, max_new_tokens=args.max_new_tokens, temperature=0.0,
                         stop_ids=stops, max_batch=16)  # fmt: skip
    answers = [tok.decode(t for t in a if t not in stops) for a in out]
    seconds = time.perf_counter() - t
    if args.log:
        Path(args.log).parent.mkdir(parents=True, exist_ok=True)
        with open(args.log, "w") as f:
            for r, a in zip(rows, answers):
                rec = {"id": r["id"], "answerable": r["answerable"], "reference": r["answer"]}
                rec |= {"answer": a, "outcome": qa_check(a, r["answer"])}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    figures = score(rows, answers)
    print_table(["figure", "value"], [[k, v] for k, v in figures.items()])
    env = environment(torch.device("cpu"), torch.float32)
    print_json("ppo_abstain", env, model=str(args.model), n=len(rows), seconds=round(seconds, 1),
               max_new_tokens=args.max_new_tokens, **figures)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write train.jsonl and eval.jsonl")
    b.add_argument("--out", required=True)
    b.add_argument("--held_out", default="Sky_(United_Kingdom)", help="article held out for eval")
    b.add_argument(
        "--per_class", type=int, default=50, help="answerable (and unanswerable) in eval"
    )
    e = sub.add_parser("eval", help="greedy answers to eval.jsonl, scored")
    e.add_argument("--model", help="model directory")
    e.add_argument("--prompts", help="eval.jsonl from build")
    e.add_argument("--rescore", default="", help="grade a --log again instead (no model)")
    e.add_argument("--log", default="")
    e.add_argument("--limit", type=int, default=0)
    e.add_argument("--max_new_tokens", type=int, default=24)
    e.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.cmd == "eval" and not args.rescore and not (args.model and args.prompts):
        ap.error("eval needs --model and --prompts (or --rescore LOG)")
    build(args) if args.cmd == "build" else evaluate(args)


if __name__ == "__main__":
    main()
