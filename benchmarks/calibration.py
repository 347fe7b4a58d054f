"""Is the confidence signal worth anything? AUROC of confidence against correctness for a chat
model's answers, and how often it abstains when the context has no answer.

The regimes:
- **squad**: SQuAD v2 dev questions (datasets/rag/qa) with their own passage as the only
  source, in `lmforge rag ask`'s prompt (numbered sources, "reply exactly: The documents do not
  contain the answer."), greedy. On answerable questions an answer is correct when it contains
  a reference answer after SQuAD normalisation (benchmarks/rag_eval.py's lenient score), and
  the confidence (infer/confidence.py: logprob, or self-consistency of k samples) is scored by
  AUROC against that. On unanswerable ones (the passage is on topic but does not answer) we
  report the abstention rate: abstaining is the right reply.
- **truthfulqa**: TruthfulQA MC1 (lmforge/eval/truthfulqa.py, log-likelihood): correct when the
  best answer gets the highest log-likelihood; the confidence is the chosen option's share of
  probability among the choices (softmax of their summed log-likelihoods).

    OMP_NUM_THREADS=1 python benchmarks/calibration.py \
        --model ~/.cache/lmforge/models/smollm2-135m-instruct --n 100 --truthfulqa 200

It prints a table, then one JSON line; every answer goes to --log (JSONL), and --rescore LOG
scores a log again without running the model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, print_json, print_table  # noqa: E402

from lmforge.infer.confidence import answer_with_confidence, auroc  # noqa: E402
from lmforge.rag.answer import build_messages  # noqa: E402
from lmforge.safety_suite import passage_hit, score_squad, squad_questions  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def gold_messages(row: dict, passage: dict) -> list[dict]:
    """rag ask's prompt with the question's own passage as source [1]."""
    return build_messages(row["question"], [passage_hit(passage)])


def run_squad(model, tok, n, methods, k, max_new_tokens, log) -> None:
    from lmforge.infer.chat import chat_prompt_ids, stop_ids

    rows, passages = squad_questions(n)
    for i, row in enumerate(rows, 1):
        ids = chat_prompt_ids(tok, gold_messages(row, passages[row["passage_id"]]))
        out = {"id": row["id"], "is_impossible": row["is_impossible"],
               "golds": [a["text"] for a in row["answers"]]}  # fmt: skip
        t = time.perf_counter()
        for m in methods:
            text, conf = answer_with_confidence(
                model, tok, ids, m, k=k, max_new_tokens=max_new_tokens, stop_ids=stop_ids(tok)
            )
            out["answer"], out[m] = text, conf["score"]
        log.write(json.dumps(out) + "\n")
        log.flush()
        print(f"[{i}/{len(rows)}] {time.perf_counter() - t:.1f}s {out['answer'][:60]!r} "
              f"{ {m: out[m] for m in methods} }", flush=True)  # fmt: skip


def run_truthfulqa(model, tok, limit: int) -> dict:
    """MC1/MC2 on the first `limit` questions, and the AUROC of the chosen option's probability
    share against MC1 correctness."""
    from lmforge.eval.truthfulqa import evaluate_truthfulqa

    path = ROOT / "datasets/eval/truthfulqa/TruthfulQA.csv.gz"
    res = evaluate_truthfulqa(model, tok, path, limit=limit, log_samples=True)
    conf, correct = [], []
    for s in res.pop("samples"):
        ll = s["mc1_loglikelihoods"]
        top = max(ll)
        probs = [math.exp(x - top) for x in ll]
        conf.append(probs[s["mc1_pred"]] / sum(probs))
        correct.append(s["mc1_pred"] == 0)
    return {**res, "auroc_choice_prob": auroc(conf, correct)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="chat model directory")
    p.add_argument("--n", type=int, default=100, help="SQuAD questions of each kind")
    p.add_argument("--methods", default="logprob", help="logprob,self_consistency")
    p.add_argument("--k", type=int, default=5, help="samples for self-consistency")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--truthfulqa", type=int, default=0, help="TruthfulQA questions (0: skip)")
    p.add_argument("--log", default=str(ROOT / "runs/calibration/squad.jsonl"))
    p.add_argument("--rescore", metavar="LOG", help="only score a logged SQuAD run again")
    args = p.parse_args()
    env = environment(torch.device("cpu"), torch.float32)
    numbers: dict = {"threads": torch.get_num_threads()}
    if args.rescore:
        lines = [json.loads(x) for x in open(args.rescore, encoding="utf-8")]
        numbers["squad"] = score_squad(lines)
    else:
        from lmforge.model.load import load

        model, tok = load(args.model, device="cpu")
        methods = [m for m in args.methods.split(",") if m]
        if args.n:
            Path(args.log).parent.mkdir(parents=True, exist_ok=True)
            with open(args.log, "w", encoding="utf-8") as log:
                run_squad(model, tok, args.n, methods, args.k, args.max_new_tokens, log)
            lines = [json.loads(x) for x in open(args.log, encoding="utf-8")]
            numbers["squad"] = score_squad(lines)
        if args.truthfulqa:
            numbers["truthfulqa"] = run_truthfulqa(model, tok, args.truthfulqa)
    rows = [[f"{part}.{key}", v] for part, d in numbers.items() if isinstance(d, dict)
            for key, v in d.items()]  # fmt: skip
    print_table(["figure", "value"], rows)
    print_json("calibration", env, **numbers)


if __name__ == "__main__":
    main()
