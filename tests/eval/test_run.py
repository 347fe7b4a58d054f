"""`lmforge eval`: result files, the table, --compare, and clear errors, through the CLI."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REPO_TQA = REPO / "datasets/eval/truthfulqa/TruthfulQA.csv.gz"
REPO_GSM8K_TEST = REPO / "datasets/eval/gsm8k/test.jsonl.gz"


def lmforge(*args):
    return subprocess.run(
        [sys.executable, "-m", "lmforge", *map(str, args)], capture_output=True, text=True
    )


def test_eval_writes_results_and_compares(micro_pretrained, tmp_path):
    model_dir = micro_pretrained[1]
    text = tmp_path / "text.txt"
    text.write_text("Once upon a time there was a cat. 从前有一只猫。\n" * 20, encoding="utf-8")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"source": "Hello", "reference": "Hi"}) + "\n", encoding="utf-8")
    out = tmp_path / "a"
    tasks = f"mmlu,cmmlu,lm:{text},sim:{pairs}"
    r = lmforge("eval", model_dir, "--tasks", tasks, "--limit", 4, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "| mmlu | acc |" in r.stdout and "| cmmlu | acc_norm |" in r.stdout
    record = json.loads((out / "mmlu.json").read_text())
    assert set(record) >= {"task", "results", "model", "config", "seed"}
    row = record["results"][0]
    assert set(row) == {"task", "metric", "value", "stderr", "n"} and row["n"] == 4
    assert record["config"]["num_fewshot"] == 5 and record["config"]["limit"] == 4
    assert record["config"]["split"] == "test" and "samples" not in record  # no --log-samples
    lm = json.loads(next(out.glob("lm_*.json")).read_text())["results"]
    metrics = {r["metric"]: r["value"] for r in lm}
    assert metrics["perplexity"] > 1 and metrics["bits_per_byte"] > 0
    sim = json.loads(next(out.glob("sim_*.json")).read_text())["results"]
    assert {r["metric"] for r in sim} == {"bleu", "rouge1", "rouge2", "rougeL"}

    r = lmforge(
        "eval", model_dir, "--tasks", "mmlu,gsm8k,humaneval", "--limit", 2, "--out", tmp_path / "b"
    )
    assert r.returncode == 0, r.stderr
    gen = {
        r["metric"]: r
        for f in ("gsm8k", "humaneval")
        for r in json.loads((tmp_path / "b" / f"{f}.json").read_text())["results"]
    }
    assert set(gen) == {"accuracy", "pass@1"} and gen["pass@1"]["n"] == 2
    isolation = json.loads((tmp_path / "b" / "humaneval.json").read_text())["isolation"]
    assert isolation["level"] in ("medium", "strong") and isolation["unsafe_exec"] is False
    assert "subreaper" in isolation["mechanisms"]
    r = lmforge("eval", "--compare", out, tmp_path / "b")
    assert r.returncode == 0 and "| mmlu | acc |" in r.stdout and "difference" in r.stdout


def test_eval_on_prepared_validation_shards(micro_prepared, micro_pretrained, tmp_path):
    data_dir = micro_prepared[1] / "data"
    r = lmforge(
        "eval", micro_pretrained[1], "--tasks", f"lm:{data_dir}", "--limit", 300, "--out", tmp_path
    )
    assert r.returncode == 0, r.stderr
    rows = json.loads(next(tmp_path.glob("lm_*.json")).read_text())["results"]
    assert {r["task"].rsplit(":", 1)[1] for r in rows} == {"en", "zh"}
    assert all(r["n"] == 299 for r in rows if r["metric"] == "loss")  # every token but the first


def test_eval_errors_are_clear(micro_pretrained, tmp_path):
    model_dir = micro_pretrained[1]
    r = lmforge("eval", model_dir, "--tasks", "mmlux", "--out", tmp_path)
    assert r.returncode == 2 and "unknown task 'mmlux'" in r.stderr and "mmlu" in r.stderr
    r = lmforge("eval", model_dir, "--tasks", f"lm:{tmp_path / 'nope.txt'}", "--out", tmp_path)
    assert r.returncode == 2 and "text file or prepared data folder not found" in r.stderr
    bad = tmp_path / "mine.yaml"
    bad.write_text("name: mine\nformat: arc\npath: nowhere\nshots: 2\n", encoding="utf-8")
    r = lmforge("eval", model_dir, "--tasks", bad, "--out", tmp_path)
    assert r.returncode == 2 and "unknown keys ['shots']" in r.stderr
    r = lmforge("eval", "--compare", tmp_path / "x", tmp_path / "y")
    assert r.returncode == 2 and "no evaluation results" in r.stderr
    r = lmforge("eval")
    assert r.returncode == 2 and "name a CHECKPOINT" in r.stderr


def test_humaneval_refuses_a_weak_sandbox_unless_unsafe_exec(
    micro_pretrained, tmp_path, monkeypatch, capsys
):
    import dataclasses

    from lmforge.cli import main
    from lmforge.eval import sandbox

    weak = dataclasses.replace(  # a host with no namespaces, no seccomp and no uid drop
        sandbox._setup(), prefix=(), namespaces=False, uid=None, setuid_in_child=False,
        seccomp=False,
    )  # fmt: skip
    monkeypatch.setattr(sandbox, "_setup", lambda: weak)
    args = ["eval", str(micro_pretrained[1]), "--tasks", "humaneval", "--limit", "1"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "refusing to run model-written code" in err and "--unsafe-exec" in err
    assert not (tmp_path / "a" / "humaneval.json").exists()
    assert main([*args, "--out", str(tmp_path / "b"), "--unsafe-exec"]) == 0
    record = json.loads((tmp_path / "b" / "humaneval.json").read_text())
    assert record["isolation"]["level"] == "weak" and record["isolation"]["unsafe_exec"] is True
    assert any(g.startswith("network") for g in record["isolation"]["gaps"])


def test_log_samples_rebuild_the_scores(micro_pretrained, tmp_path):
    """--log-samples: one record per scored question with the interface other scripts read;
    the exposed prompt builders rebuild the exact text, so rescoring a sample by hand gives
    the logged log-likelihoods."""
    from lmforge.eval import generative, truthfulqa
    from lmforge.eval import run as evaluation
    from lmforge.eval.scoring import loglikelihood
    from lmforge.model.load import load
    from lmforge.tasks.gsm8k import extract_answer
    from lmforge.tasks.multiple_choice import build_context, load_rows, load_task, target

    model_dir = micro_pretrained[1]
    tasks = ["mmlu", "truthfulqa", "gsm8k"]
    evaluation.run(model_dir, tasks, tmp_path, limit=3, log_samples=True)
    model, tok = load(model_dir)
    bos = [tok.bos_id] if tok.prepend_bos else []

    mmlu = json.loads((tmp_path / "mmlu.json").read_text())
    config = mmlu["config"]
    assert (config["split"], config["fewshot_split"], config["num_fewshot"]) == ("test", "dev", 5)
    assert config["sample"] == "stratified by subject, seed 0" and len(mmlu["samples"]) == 3
    task = load_task("mmlu")
    rows, shots = load_rows("mmlu", task.path, "test"), load_rows("mmlu", task.path, "dev")
    keys = ["index", "subject", "question", "choices", "gold", "loglikelihoods", "pred"]
    for s in mmlu["samples"]:
        assert list(s) == keys + ["pred_norm"]
        row = rows[s["index"]]
        assert (s["question"], s["choices"], s["gold"]) == (
            row["question"], row["choices"], row["gold"]
        )  # fmt: skip
        ctx = bos + tok.encode(build_context(task, row, shots))
        again = loglikelihood(model, [(ctx, tok.encode(target(task, row, i))) for i in range(4)])
        assert [round(ll, 4) for ll, _ in again] == [round(ll, 4) for ll in s["loglikelihoods"]]
        assert s["pred"] == max(range(4), key=s["loglikelihoods"].__getitem__)
    assert [s["index"] for s in mmlu["samples"]] == sorted(s["index"] for s in mmlu["samples"])

    tqa = json.loads((tmp_path / "truthfulqa.json").read_text())
    assert tqa["config"]["split"] == "validation" and tqa["config"]["sample"] == "first 3"
    rows = truthfulqa.load_truthfulqa(REPO_TQA)
    for s in tqa["samples"]:
        assert list(s) == [
            "index", "question", "mc1_loglikelihoods", "mc1_pred", "mc2_true_loglikelihoods",
            "mc2_false_loglikelihoods", "mc2",
        ]  # fmt: skip
        row = rows[s["index"]]
        assert len(s["mc1_loglikelihoods"]) == len(row["mc1_choices"])
        ctx = bos + tok.encode(truthfulqa.build_context(row))
        (best, _), *_ = loglikelihood(model, [(ctx, tok.encode(" " + row["mc1_choices"][0]))])
        assert round(best, 4) == round(s["mc1_loglikelihoods"][0], 4)
        assert s["mc2"] == truthfulqa.mc2_score(
            s["mc2_true_loglikelihoods"], s["mc2_false_loglikelihoods"]
        )

    gsm = json.loads((tmp_path / "gsm8k.json").read_text())
    assert (gsm["config"]["split"], gsm["config"]["num_fewshot"]) == ("test", 8)
    test_rows = generative.load_jsonl(REPO_GSM8K_TEST)
    for i, s in enumerate(gsm["samples"]):
        assert list(s) == ["index", "question", "output", "pred", "gold", "correct"]
        assert s["index"] == i and s["question"] == test_rows[i]["question"]
        assert s["gold"] == extract_answer(test_rows[i]["answer"])
        assert s["correct"] == (s["pred"] is not None and s["pred"] == s["gold"])
    accuracy = gsm["results"][0]["value"]
    assert accuracy == sum(s["correct"] for s in gsm["samples"]) / 3


def test_split_and_fewshot_options(micro_pretrained, tmp_path, capsys):
    """--split and --num-fewshot override the task's own and are recorded; unknown splits and
    impossible k are clear errors listing what exists."""
    from lmforge.cli import main

    model_dir = str(micro_pretrained[1])
    base = ["eval", model_dir, "--limit", "2", "--log-samples"]
    assert main([*base, "--tasks", "mmlu", "--split", "val", "--out", str(tmp_path)]) == 2
    assert "no split 'val'" in capsys.readouterr().err  # and the ones present:
    assert main([*base, "--tasks", "gsm8k", "--split", "dev", "--out", str(tmp_path)]) == 2
    assert "task gsm8k: no split 'dev'; splits present: test, train" in capsys.readouterr().err
    assert main([*base, "--tasks", "truthfulqa", "--split", "test", "--out", str(tmp_path)]) == 2
    assert "splits present: validation" in capsys.readouterr().err
    assert main([*base, "--tasks", "truthfulqa", "--num-fewshot", "3", "--out", str(tmp_path)]) == 2
    assert "task truthfulqa takes no few-shot examples" in capsys.readouterr().err
    assert main([*base, "--tasks", "gsm8k", "--num-fewshot", "9", "--out", str(tmp_path)]) == 2
    assert "--num-fewshot 9 is out of range: 0..8" in capsys.readouterr().err
    assert main([*base[:2], "--tasks", "mmlu", "--limit", "0", "--out", str(tmp_path)]) == 2
    assert "--limit must be at least 1" in capsys.readouterr().err

    out = tmp_path / "dev"
    args = ["--tasks", "gsm8k,mmlu", "--split", "train", "--num-fewshot", "2", "--out", str(out)]
    assert main([*base, *args]) == 2  # mmlu has no train split: refused before anything runs
    assert "splits present: dev, test" in capsys.readouterr().err
    assert not out.exists()
    args = ["--tasks", "mmlu", "--split", "dev", "--num-fewshot", "2", "--out", str(out)]
    assert main([*base, *args]) == 0
    config = json.loads((out / "mmlu.json").read_text())["config"]
    assert (config["split"], config["fewshot_split"], config["num_fewshot"]) == ("dev", "dev", 2)
    args = ["--tasks", "gsm8k", "--split", "train", "--num-fewshot", "1", "--out", str(out)]
    assert main([*base, *args]) == 0
    record = json.loads((out / "gsm8k.json").read_text())
    assert (record["config"]["split"], record["config"]["num_fewshot"]) == ("train", 1)
    assert [s["index"] for s in record["samples"]] == [8, 9]  # after the 8-row exemplar pool
    assert record["config"]["sample"] == "first 2"


def test_gsm8k_default_split_is_test(micro_pretrained, tmp_path):
    from lmforge.eval import generative
    from lmforge.eval import run as evaluation

    evaluation.run(micro_pretrained[1], ["gsm8k"], tmp_path, limit=1, log_samples=True)
    record = json.loads((tmp_path / "gsm8k.json").read_text())
    config = record["config"]
    assert config["split"] == "test" and config["path"].endswith("gsm8k/test.jsonl.gz")
    assert (config["fewshot_split"], config["num_fewshot"]) == ("train", 8)
    first_test = generative.load_jsonl(REPO_GSM8K_TEST)[0]["question"]
    assert record["samples"][0]["question"] == first_test and record["samples"][0]["index"] == 0
