"""`lmforge eval`: result files, the table, --compare, and clear errors, through the CLI."""

import json
import subprocess
import sys


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
    assert record["config"]["num_fewshot"] == 4 and record["config"]["limit"] == 4
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
