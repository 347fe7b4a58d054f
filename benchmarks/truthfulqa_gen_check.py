"""Score `lmforge eval --tasks truthfulqa_gen --log-samples` answers again with
lm-evaluation-harness's own truthfulqa_gen functions (`preprocess_function`,
`process_results_gen`: sacrebleu and rouge-score), answer by answer, and print the largest
difference per metric. Two steps, because lm-eval lives in a venv of its own, the one
benchmarks/eval_agreement.py and docs/evaluation-check.md set up:

    python3 -m venv .lmeval-venv && .lmeval-venv/bin/pip install torch==2.13.0 "lm_eval[hf]==0.4.13"
    python benchmarks/truthfulqa_gen_check.py export runs/tqa_gen100/truthfulqa_gen.json items.json
    .lmeval-venv/bin/python benchmarks/truthfulqa_gen_check.py score items.json

The answers are scored as lm-eval would score the same text (with its leading space); its own
prompt ends at the question, so its model also writes "A:", which this check leaves out.
"""

import json
import sys
from pathlib import Path

CSV = Path(__file__).resolve().parent.parent / "datasets/eval/truthfulqa/TruthfulQA.csv.gz"


def export(record_path: str, out_path: str) -> None:
    from lmforge.eval.truthfulqa import load_truthfulqa

    rows = load_truthfulqa(CSV)
    items = []
    for s in json.loads(Path(record_path).read_text())["samples"]:
        row = rows[s["index"]]
        ours = {k: v for k, v in s.items() if k.endswith(("_max", "_acc", "_diff"))}
        items.append({"question": row["question"], "correct_answers": row["mc2_true"],
                      "incorrect_answers": row["mc2_false"], "answer": s["answer"],
                      "ours": ours})  # fmt: skip
    Path(out_path).write_text(json.dumps(items))
    print(f"{len(items)} answers written to {out_path}")


def score(items_path: str) -> None:
    from lm_eval.tasks.truthfulqa import utils

    items = json.loads(Path(items_path).read_text())
    worst: dict[str, float] = {}
    for it in items:
        doc = utils.preprocess_function({k: it[k] for k in
                                         ("question", "correct_answers", "incorrect_answers")})  # fmt: skip
        for k, v in utils.process_results_gen(doc, [" " + it["answer"]]).items():
            worst[k] = max(worst.get(k, 0.0), abs(float(v) - it["ours"][k]))
    print(f"{len(items)} answers; largest difference per metric: {json.dumps(worst)}")


if __name__ == "__main__":
    {"export": export, "score": score}[sys.argv[1]](*sys.argv[2:])
