"""Our benchmark scores checked by a second, independent scorer: lm-evaluation-harness.

The one idea: score exactly the questions our side scored, with the same prompts, by a path
that shares no model or scoring code with lmforge (transformers' LlamaForCausalLM, lm-eval's own
task templates, request building, log-likelihoods and MC2 formula), then compare question by
question. Our side is `lmforge eval --log-samples`; its samples name the rows it scored, and
those rows become local lm-eval task files (`dataset_path: json`), run offline. Disagreements are
listed with both sides' margins: a near-tie (the top two choices within ~1e-3 nats) flips on
float rounding alone; a large margin on one side means a real difference in prompt or scoring.

lm-eval runs in its own virtual environment (it must not see lmforge):

    python3 -m venv .lmeval-venv          # in the repository root (git ignores it)
    .lmeval-venv/bin/pip install torch==2.13.0 "lm_eval[hf]==0.4.13"
    python benchmarks/eval_agreement.py --tasks mmlu --mmlu-n 2000 --mmlu-shots 0
    python benchmarks/eval_agreement.py --tasks truthfulqa,gsm8k --truthfulqa-n 817 --gsm8k-n 200
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = Path.home() / ".cache/lmforge/models/smollm2-135m-instruct"
LETTERS = "ABCD"
NEAR_TIE = 1e-3  # nats: a margin this small flips on float rounding (batching, kernels)
GSM8K_STOP = ["Question:", "\n\n"]  # our stop strings (lmforge/tasks/gsm8k.py)
GSM8K_MAX_NEW = 128  # our token budget per answer


# --- our side: `lmforge eval --log-samples`


def run_ours(task: str, args, out: Path) -> list[dict]:
    """Our samples for one task, from `python -m lmforge eval` (reused when already there)."""
    result = out / f"{task}.json"
    if not result.is_file() and not args.run:
        sys.exit(f"--compare-only: our side of {task} is not in {out}")
    if not result.is_file():
        cmd = [sys.executable, "-m", "lmforge", "eval", str(args.model), "--tasks", task]
        cmd += ["--out", str(out), "--seed", str(args.seed), "--log-samples"]
        cmd += ["--limit", str(_limit(task, args))]
        if task == "mmlu":
            cmd += ["--num-fewshot", str(args.mmlu_shots)]
        if task == "gsm8k":
            cmd += ["--num-fewshot", str(args.gsm8k_shots)]
        _run(cmd, _env(args.threads), f"ours: {task}")
    return json.loads(result.read_text(encoding="utf-8"))["samples"]


def _limit(task: str, args) -> int:
    return {"mmlu": args.mmlu_n, "truthfulqa": args.truthfulqa_n, "gsm8k": args.gsm8k_n}[task]


def _env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    # offline: every row comes from local files; nothing may reach a hub
    env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _run(cmd: list[str], env: dict, what: str) -> None:
    """Run a side, its output streamed (lm-eval's progress bars included), timed."""
    print(f"[{time.strftime('%H:%M:%S')}] {what}: {' '.join(cmd)}", flush=True)
    t = time.perf_counter()
    done = subprocess.run(cmd, env=env)
    if done.returncode != 0:
        sys.exit(f"{what} failed (exit {done.returncode}); command: {' '.join(cmd)}")
    print(f"[{time.strftime('%H:%M:%S')}] {what}: {time.perf_counter() - t:.0f} s", flush=True)


# --- their side: the same rows as local lm-eval tasks


def _read_csv_rows(path: Path) -> list[dict]:
    """MMLU rows from a CSV in the mirror's form (header, choice0-3, 0-based answer) or the
    official headerless form (question, A, B, C, D, letter)."""
    data = path.read_bytes()
    text = (gzip.decompress(data) if path.suffix == ".gz" else data).decode("utf-8")
    rows = list(csv.reader(text.splitlines(keepends=True)))
    if rows and rows[0] == ["question", "choice0", "choice1", "choice2", "choice3", "answer"]:
        return [{"question": r[0], "choices": r[1:5], "answer": int(r[5])} for r in rows[1:]]
    return [{"question": r[0], "choices": r[1:5], "answer": LETTERS.index(r[5])} for r in rows]


def _write_jsonl(path: Path, docs: list[dict]) -> str:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return str(path)


def _task_yaml(folder: Path, name: str, include: Path, data_files: dict, **extra) -> str:
    """A local task: lm-eval's own definition (`include`), its data read from JSON files."""
    cfg = {
        "include": str(include),
        "task": name,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": data_files},
        **extra,
    }
    (folder / f"{name}.yaml").write_text(
        json.dumps(cfg, indent=1), encoding="utf-8"
    )  # JSON is YAML
    return name


def mmlu_tasks(samples: list[dict], dev_dir: Path, lm_eval_dir: Path, folder: Path) -> list[str]:
    """One task per subject (lm-eval's MMLU template; its shots are the subject's first dev
    rows), holding exactly the questions our side scored; each doc keeps our index."""
    by_subject: dict[str, list[dict]] = {}
    for s in samples:
        doc = {"index": s["index"], "question": s["question"], "choices": s["choices"]}
        by_subject.setdefault(s["subject"], []).append(doc | {"answer": s["gold"]})
    names = []
    for subject, docs in sorted(by_subject.items()):
        dev = sorted(dev_dir.glob(f"{subject}_dev.csv*"))
        if not dev:
            sys.exit(f"no MMLU dev file for {subject} in {dev_dir} (the few-shot rows)")
        files = {
            "test": _write_jsonl(folder / f"mmlu_{subject}_test.jsonl", docs),
            "dev": _write_jsonl(folder / f"mmlu_{subject}_dev.jsonl", _read_csv_rows(dev[0])),
        }
        names.append(
            _task_yaml(
                folder,
                f"agree_mmlu_{subject}",
                lm_eval_dir / "tasks/mmlu/default/_default_template_yaml",
                files,
                description="The following are multiple choice questions (with answers) "
                f"about {subject.replace('_', ' ')}.\n\n",
            )
        )
    return names


def truthfulqa_rows(path: Path, n: int) -> list[dict]:
    """The first n questions of TruthfulQA.csv with the answer lists our side scores (see
    lmforge/eval/truthfulqa.py, rebuilt here from the CSV rather than imported): MC1 is the Best
    Answer then the Incorrect Answers; MC2's true answers are the Correct Answers, its false
    ones the Incorrect Answers; each answer ends with a period."""

    def answers(cell: str) -> list[str]:
        out = [a.strip() for a in cell.split("; ") if a.strip()]
        return [a if a.endswith(".") else a + "." for a in out]

    data = path.read_bytes()
    text = (gzip.decompress(data) if path.suffix == ".gz" else data).decode("utf-8")
    rows = []
    for r in list(csv.DictReader(text.splitlines(keepends=True)))[:n]:
        false = answers(r["Incorrect Answers"])
        rows.append(
            {
                "question": r["Question"].strip(),
                "mc1": answers(r["Best Answer"])[:1] + false,
                "true": answers(r["Correct Answers"]),
                "false": false,
            }
        )
    return rows


def truthfulqa_tasks(
    samples: list[dict], csv_path: Path, lm_eval_dir: Path, folder: Path
) -> list[str]:
    """lm-eval's truthfulqa_mc1 and truthfulqa_mc2 (its 6-shot QA primer, its MC2 formula) on
    the questions our side scored, with the answer lists our side scored."""
    rows = truthfulqa_rows(csv_path, max(s["index"] for s in samples) + 1)
    docs = []
    for s in samples:
        r = rows[s["index"]]
        counts = (len(r["mc1"]), len(r["true"]), len(r["false"]))
        ours = tuple(
            len(s[k])
            for k in ("mc1_loglikelihoods", "mc2_true_loglikelihoods", "mc2_false_loglikelihoods")
        )
        if r["question"] != s["question"].strip() or counts != ours:
            sys.exit(
                f"truthfulqa question {s['index']}: our sample scored other answers than {csv_path} gives"
            )
        docs.append(
            {
                "index": s["index"],
                "question": r["question"],
                # lm-eval's layout: mc1's correct answer first; mc2 labels 1 (true) / 0 (false)
                "mc1_targets": {"choices": r["mc1"], "labels": [1] + [0] * (len(r["mc1"]) - 1)},
                "mc2_targets": {
                    "choices": r["true"] + r["false"],
                    "labels": [1] * len(r["true"]) + [0] * len(r["false"]),
                },
            }
        )
    files = {"validation": _write_jsonl(folder / "truthfulqa.jsonl", docs)}
    base = lm_eval_dir / "tasks/truthfulqa"
    return [
        _task_yaml(folder, f"agree_truthfulqa_{mc}", base / f"truthfulqa_{mc}.yaml", files)
        for mc in ("mc1", "mc2")
    ]


def gsm8k_tasks(
    samples: list[dict],
    shots: list[dict],
    stop: list[str],
    max_new_tokens: int,
    lm_eval_dir: Path,
    folder: Path,
) -> list[str]:
    """lm-eval's gsm8k task on the problems our side scored, with our shots (as the prompt shows
    them) taken first_n, our stop strings and token budget, greedy."""
    docs = [{"index": s["index"], "question": s["question"], "answer": s["gold"]} for s in samples]
    files = {
        "test": _write_jsonl(folder / "gsm8k_test.jsonl", docs),
        "train": _write_jsonl(folder / "gsm8k_shots.jsonl", shots),
    }
    gen = {"until": stop, "do_sample": False, "max_gen_toks": max_new_tokens}
    # lm-eval's own flexible extraction: the last number in the answer
    flexible = [
        {"function": "regex", "group_select": -1, "regex_pattern": r"(-?[$0-9.,]{2,})|(-?[0-9]+)"},
        {"function": "take_first"},
    ]
    return [
        _task_yaml(
            folder,
            "agree_gsm8k",
            lm_eval_dir / "tasks/gsm8k/gsm8k.yaml",
            files,
            fewshot_config={"sampler": "first_n"},
            generation_kwargs=gen,
            filter_list=[{"name": "flexible-extract", "filter": flexible}],
        )
    ]


def run_theirs(
    tasks: list[str], folder: Path, shots: int, args, out: Path, run: bool = True
) -> dict[str, list]:
    """lm-eval on the local tasks; its logged samples per task, in doc order (with run=False,
    only those already in `out`)."""
    found = {t: sorted(out.glob(f"**/samples_{t}_*.jsonl")) for t in tasks}
    if run and not all(found.values()):
        cmd = [str(args.lm_eval), "--model", "hf", "--tasks", ",".join(tasks)]
        cmd += ["--model_args", f"pretrained={args.model},dtype=float32", "--device", "cpu"]
        cmd += ["--include_path", str(folder), "--num_fewshot", str(shots), "--log_samples"]
        cmd += ["--output_path", str(out), "--batch_size", str(args.batch_size)]
        env = _env(args.threads)
        env.pop("PYTHONPATH")  # the independent side must not see lmforge
        _run(cmd, env, f"lm-eval: {','.join(tasks)[:60]}")
        found = {t: sorted(out.glob(f"**/samples_{t}_*.jsonl")) for t in tasks}
    samples = {}
    for t, files in found.items():
        if files:
            lines = (
                files[-1].read_text(encoding="utf-8").split("\n")
            )  # not splitlines: JSON strings may hold U+2028
            samples[t] = sorted((json.loads(x) for x in lines if x), key=lambda d: d["doc_id"])
    return samples


def mmlu_parts(ours: list[dict], parts: int) -> list[list[dict]]:
    """Our MMLU samples in `parts` slices, each holding every parts-th question of every
    subject: each slice is a stratified sample in itself, so the comparison on however many
    slices lm-eval finished still covers all subjects."""
    seen: dict[str, int] = {}
    slices: list[list[dict]] = [[] for _ in range(parts)]
    for s in ours:
        k = seen.get(s["subject"], 0)
        seen[s["subject"]] = k + 1
        slices[k % parts].append(s)
    return [x for x in slices if x]


def gsm8k_shots(path: Path, k: int) -> list[dict]:
    """The first k train rows, their answers as our prompt shows them: calculator notes
    `<<48/2=24>>` removed and `#### N` written "The answer is N."."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(k), f)]
    shots = []
    for r in rows:
        reasoning, _, final = r["answer"].partition("####")
        reasoning = re.sub(r"<<[^>]*>>", "", reasoning).strip()
        shots.append(
            {"question": r["question"], "answer": f"{reasoning}\nThe answer is {final.strip()}."}
        )
    return shots


# --- comparison, question by question


def _by_index(theirs: list[dict]) -> dict[int, dict]:
    return {d["doc"]["index"]: d for d in theirs}


def _lls(sample: dict) -> list[float]:
    """lm-eval's per-choice log-likelihoods: resps is [[(ll, is_greedy)], ...]."""
    return [float(r[0][0]) for r in sample["resps"]]


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=xs.__getitem__)  # the first of ties, as np.argmax


def _margin(xs: list[float]) -> float:
    """How far the chosen answer is ahead of the runner-up (nats)."""
    top = sorted(xs, reverse=True)
    return top[0] - top[1] if len(top) > 1 else math.inf


def compare_choices(name: str, ours: list[tuple], theirs: list[tuple]) -> dict:
    """ours/theirs: (index, log-likelihoods, gold) per question, same order. Accuracy, agreement,
    the largest log-likelihood difference, and each disagreement with both margins."""
    agree, acc_a, acc_b, ll_diff, flips = 0, 0, 0, [], []
    for (i, la, gold), (_, lb, _) in zip(ours, theirs, strict=True):
        pa, pb = _argmax(la), _argmax(lb)
        agree += pa == pb
        acc_a += pa == gold
        acc_b += pb == gold
        ll_diff.append(max(abs(a - b) for a, b in zip(la, lb, strict=True)))
        if pa != pb:
            flips.append(
                {
                    "index": i,
                    "ours": pa,
                    "theirs": pb,
                    "our_margin": _margin(la),
                    "their_margin": _margin(lb),
                }
            )
    n = len(ours)
    return {
        "task": name,
        "n": n,
        "ours": acc_a / n,
        "theirs": acc_b / n,
        "identical": agree / n,
        "max_ll_diff": max(ll_diff),
        "mean_ll_diff": sum(ll_diff) / n,
        "disagreements": flips,
    }


def compare_mmlu(ours: list[dict], theirs: dict[str, list]) -> list[dict]:
    """On the questions lm-eval scored (all of ours unless --mmlu-parts stopped early)."""
    them = {i: d for t in theirs.values() for i, d in _by_index(t).items()}
    both = [s for s in ours if s["index"] in them]
    if not both:
        print("mmlu: lm-eval has scored none of our questions yet: nothing to compare")
        return []
    a = [(s["index"], s["loglikelihoods"], s["gold"]) for s in both]
    b = [(s["index"], _lls(them[s["index"]]), s["gold"]) for s in both]
    row = compare_choices("mmlu", a, b)
    ours_all = sum(_argmax(s["loglikelihoods"]) == s["gold"] for s in ours) / len(ours)
    return [row | {"ours_all": ours_all, "n_ours": len(ours)}]


def compare_truthfulqa(ours: list[dict], theirs: dict[str, list]) -> list[dict]:
    mc1, mc2 = _by_index(theirs["agree_truthfulqa_mc1"]), _by_index(theirs["agree_truthfulqa_mc2"])
    a = [(s["index"], s["mc1_loglikelihoods"], 0) for s in ours]
    b = [(s["index"], _lls(mc1[s["index"]]), 0) for s in ours]
    rows = [compare_choices("truthfulqa_mc1", a, b)]
    # MC2 is a score per question (the normalised probability mass on the true answers)
    va = [s["mc2"] for s in ours]
    vb = [float(mc2[s["index"]]["acc"]) for s in ours]
    diffs = [abs(x - y) for x, y in zip(va, vb)]
    ll_a = [s["mc2_true_loglikelihoods"] + s["mc2_false_loglikelihoods"] for s in ours]
    ll_b = [_lls(mc2[s["index"]]) for s in ours]
    ll_diff = [max(abs(x - y) for x, y in zip(p, q, strict=True)) for p, q in zip(ll_a, ll_b)]
    n = len(ours)
    rows.append(
        {
            "task": "truthfulqa_mc2",
            "n": n,
            "ours": sum(va) / n,
            "theirs": sum(vb) / n,
            "identical": None,
            "mean_abs_mc2_diff": sum(diffs) / n,
            "max_abs_mc2_diff": max(diffs),
            "max_ll_diff": max(ll_diff),
            "mean_ll_diff": sum(ll_diff) / n,
            "disagreements": [],
        }
    )
    return rows


def _number(text: str | None) -> str | None:
    """A final answer as a plain number string ("$1,234." -> "1234"), or None."""
    if text is None:
        return None
    s = re.sub(r"[$,]", "", str(text)).strip().rstrip(".")
    try:
        return str(float(s)).removesuffix(".0")
    except ValueError:
        return None


def compare_gsm8k(ours: list[dict], theirs: dict[str, list]) -> list[dict]:
    them = _by_index(theirs["agree_gsm8k"])
    same_text, same_pred, acc_a, acc_b, flips = 0, 0, 0, 0, []
    for s in ours:
        d = them[s["index"]]
        text, pred = d["resps"][0][0], d["filtered_resps"][0]
        same_text += text.strip() == s["output"].strip()
        same_pred += _number(pred) == _number(s["pred"])
        acc_a += bool(s["correct"])
        acc_b += float(d["exact_match"]) > 0
        if _number(pred) != _number(s["pred"]):
            flips.append({"index": s["index"], "ours": s["pred"], "theirs": pred})
    n = len(ours)
    return [
        {
            "task": "gsm8k",
            "n": n,
            "ours": acc_a / n,
            "theirs": acc_b / n,
            "identical": same_pred / n,
            "identical_text": same_text / n,
            "disagreements": flips,
        }
    ]


# --- report


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def print_report(rows: list[dict], show: int) -> None:
    """Per task: n, both accuracies, difference, % identical predictions; then disagreements."""
    print(
        "\n| task | n | ours | lm-eval | difference (points) | identical predictions % | "
        "max abs log-lik. difference | note |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        note = ""
        if "mean_abs_mc2_diff" in r:
            note = f"MC2 mean abs difference {r['mean_abs_mc2_diff']:.2e}"
        if r.get("n_ours", r["n"]) > r["n"]:
            note = (
                f"lm-eval scored {r['n']} of our {r['n_ours']} (stratified slices); "
                f"ours on all {r['n_ours']}: {_pct(r['ours_all'])}"
            )
        if "identical_text" in r:
            note = f"identical answer texts {_pct(r['identical_text'])}%"
        ll = f"{r['max_ll_diff']:.2e}" if "max_ll_diff" in r else "-"
        print(
            f"| {r['task']} | {r['n']} | {_pct(r['ours'])} | {_pct(r['theirs'])} | "
            f"{100 * (r['theirs'] - r['ours']):+.2f} | {_pct(r['identical'])} | {ll} | {note} |"
        )
    for r in rows:
        flips = r["disagreements"]
        if not flips:
            continue
        print(
            f"\n{r['task']}: {len(flips)} disagreement(s)"
            + (f", first {show}" if len(flips) > show else "")
        )
        for f in flips[:show]:
            if "our_margin" in f:
                tie = "near-tie" if min(f["our_margin"], f["their_margin"]) < NEAR_TIE else ""
                print(
                    f"  index {f['index']}: ours {f['ours']} (margin {f['our_margin']:.2e}), "
                    f"lm-eval {f['theirs']} (margin {f['their_margin']:.2e}) {tie}"
                )
            else:
                print(f"  index {f['index']}: ours {f['ours']!r}, lm-eval {f['theirs']!r}")


# --- the run


def lm_eval_package(lm_eval: Path) -> Path:
    """Where lm-eval's own task definitions lie, asked of its interpreter."""
    python = lm_eval.parent / "python"
    code = "import lm_eval, os; print(os.path.dirname(lm_eval.__file__))"
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"lm-eval is not importable by {python}: see the module docstring to install it")
    return Path(done.stdout.strip())


def check_task(task: str, args, out: Path, tmp: Path, lm_eval_dir: Path) -> list[dict]:
    """Both sides of one task, compared."""
    ours = run_ours(task, args, out / "ours")
    folder = tmp / task
    folder.mkdir()
    theirs_out = out / "lm-eval" / task
    if task == "mmlu":
        theirs: dict[str, list] = {}
        for i, part in enumerate(mmlu_parts(ours, args.mmlu_parts)):
            sub = folder / f"part{i}"
            sub.mkdir()
            names = mmlu_tasks(part, args.mmlu_dev, lm_eval_dir, sub)
            got = run_theirs(names, sub, args.mmlu_shots, args, theirs_out / f"part{i}", args.run)
            theirs |= {f"{t}/{i}": v for t, v in got.items()}
            print(
                f"[{time.strftime('%H:%M:%S')}] lm-eval: MMLU part {i + 1} of {args.mmlu_parts}"
                f" ({len(part)} questions) {'done' if got else 'not run'}",
                flush=True,
            )
        return compare_mmlu(ours, theirs)
    if task == "truthfulqa":
        names = truthfulqa_tasks(ours, args.truthfulqa_csv, lm_eval_dir, folder)
        return compare_truthfulqa(ours, run_theirs(names, folder, 0, args, theirs_out, args.run))
    shots = gsm8k_shots(args.gsm8k_train, args.gsm8k_shots)
    names = gsm8k_tasks(ours, shots, GSM8K_STOP, GSM8K_MAX_NEW, lm_eval_dir, folder)
    return compare_gsm8k(ours, run_theirs(names, folder, len(shots), args, theirs_out, args.run))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="imported model directory")
    p.add_argument("--tasks", default="mmlu,truthfulqa,gsm8k", help="comma-separated")
    p.add_argument("--mmlu-n", type=int, default=2000, help="MMLU test questions (stratified)")
    p.add_argument("--mmlu-shots", type=int, default=5, help="MMLU dev exemplars per prompt")
    p.add_argument("--truthfulqa-n", type=int, default=817, help="TruthfulQA questions")
    p.add_argument("--gsm8k-n", type=int, default=200, help="GSM8K test problems")
    p.add_argument("--gsm8k-shots", type=int, default=8, help="GSM8K train exemplars")
    p.add_argument("--seed", type=int, default=0, help="the sample's seed (our --seed)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for each side")
    p.add_argument("--batch-size", type=int, default=8, help="lm-eval's batch size")
    p.add_argument(
        "--lm-eval",
        type=Path,
        default=Path(os.environ.get("LMFORGE_LM_EVAL") or REPO / ".lmeval-venv/bin/lm_eval"),
        help="the lm_eval command of lm-eval's own virtual environment (default: "
        "$LMFORGE_LM_EVAL, else .lmeval-venv/bin/lm_eval in the repository)",
    )
    p.add_argument(
        "--mmlu-dev",
        type=Path,
        default=REPO / "datasets/eval/mmlu/dev",
        help="MMLU dev CSVs (lm-eval's shots)",
    )
    p.add_argument(
        "--gsm8k-train",
        type=Path,
        default=REPO / "datasets/eval/gsm8k/train_head300.jsonl.gz",
        help="GSM8K train rows (the shots: the first --gsm8k-shots)",
    )
    p.add_argument(
        "--truthfulqa-csv",
        type=Path,
        default=REPO / "datasets/eval/truthfulqa/TruthfulQA.csv.gz",
        help="TruthfulQA.csv (the answer lists our side scored)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=REPO / "runs/agreement",
        help="both sides' outputs; a side already there is reused, not rerun",
    )
    p.add_argument(
        "--mmlu-parts",
        type=int,
        default=1,
        help="run lm-eval on MMLU in this many stratified slices (each saved as it finishes)",
    )
    p.add_argument(
        "--compare-only",
        dest="run",
        action="store_false",
        help="run nothing: compare what both sides have saved in --out",
    )
    p.add_argument("--show", type=int, default=20, help="disagreements listed per task")
    args = p.parse_args()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - {"mmlu", "truthfulqa", "gsm8k"})
    if unknown:
        sys.exit(f"--tasks: unknown {unknown}; choose from mmlu, truthfulqa, gsm8k")
    if not (args.model / "config.json").is_file():
        sys.exit(
            f"--model: no config.json in {args.model} (run `lmforge fetch smollm2-135m-instruct`)"
        )
    if not args.lm_eval.is_file():
        raise SystemExit(
            f"no lm_eval command at {args.lm_eval}: make lm-eval's own venv first (see this "
            "script's docstring) or pass --lm-eval PATH"
        )
    lm_eval_dir = lm_eval_package(args.lm_eval)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for task in tasks:
            rows += check_task(task, args, args.out, Path(tmp), lm_eval_dir)
    print_report(rows, args.show)
    (args.out / "agreement.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    env = {
        "model": str(args.model),
        "threads": args.threads,
        "seed": args.seed,
        "mmlu_shots": args.mmlu_shots if "mmlu" in tasks else None,
        "lm_eval_batch_size": args.batch_size,
        "commit": _commit(),
    }
    print(json.dumps(env))


def _commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    )
    return done.stdout.strip() or "unknown"


if __name__ == "__main__":
    main()
