"""lmforge clean: each step removes what it should, the output is the same whatever the workers or
executor, a killed run resumes without redoing finished shards, and bad input is reported."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmforge.config import CleanConfig, DataConfig, SourceConfig
from lmforge.data import clean
from lmforge.data.readers import DataError, iter_documents

REPO = Path(__file__).resolve().parents[2]
STEPS = ["normalize", "language", "quality", "toxicity", "pii", "exact_dedup", "near_dedup"]


def _enwiki(n: int) -> list[str]:
    src = SourceConfig(name="enwiki", path="datasets/enwiki", format="jsonl", max_docs=n)
    return list(iter_documents(src, str(REPO)))


def _zh_paragraphs(n: int) -> list[str]:
    src = SourceConfig(
        name="xiyou",
        path="datasets/chinese/novel_xiyou_ji.txt.gz",
        split_on="line",
        min_chars=400,
        max_docs=n,
    )
    return list(iter_documents(src, str(REPO)))


def _edit(text: str) -> str:
    """A near-duplicate: a few words changed in the middle."""
    words = text.split()
    for i in range(10, len(words), 40):
        words[i] = "changed"
    return " ".join(words)


def make_corpus(d: Path, n_en: int = 40, n_zh: int = 12) -> tuple[DataConfig, dict]:
    en = _enwiki(n_en)
    planted = {
        "exact": en[0].upper().replace(" ", "  "),  # same normalised text as en[0]
        "near": _edit(en[1]),
        "french": "Le chat est assis sur le tapis. " * 20
        + "Il regarde les oiseaux dans le jardin et attend le retour de son maître.",
        "short": "Click here to subscribe.",
        "pii": en[2] + " Write to jane.doe@example.com for a copy.",
    }
    # en[2] is only there with an e-mail address added (with it, the two would be near duplicates)
    rows = [{"text": t} for i, t in enumerate(en) if i != 2]
    rows += [{"text": t} for t in planted.values()]
    with gzip.open(d / "en.jsonl.gz", "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    (d / "zh.txt").write_text("\n".join(_zh_paragraphs(n_zh)) + "\n", encoding="utf-8")
    data = DataConfig(
        sources=[
            {"name": "en", "path": str(d / "en.jsonl.gz")},
            {"name": "zh", "path": str(d / "zh.txt"), "split_on": "line", "lang": "zh"},
        ]
    )
    return data, planted


def outputs(out: Path) -> dict[str, list[dict]]:
    files = sorted(out.glob("*/part-*"))
    return {f"{p.parent.name}/{p.name}": clean._read_docs(p, "jsonl") for p in files}


def run_clean(data, out, **kw) -> dict:
    cfg = CleanConfig(**{"steps": STEPS, "languages": ["en", "zh"], "shard_docs": 10, **kw})
    return clean.run(cfg, data, ".", out, log=lambda *a: None)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    data, planted = make_corpus(d)
    report = run_clean(data, d / "out", num_workers=1)
    return d, data, planted, report


def test_each_step_removes_what_it_should(corpus):
    d, data, planted, report = corpus
    steps = report["steps"]
    assert list(steps) == STEPS
    assert steps["language"]["removed"] == {"language_fr": 1}
    assert "too_few_words" in steps["quality"]["removed"]
    assert steps["exact_dedup"]["removed"] == {"exact_duplicate": 1}
    assert steps["near_dedup"]["removed"] == {"near_duplicate": 1}
    assert steps["pii"]["counts"].get("email") == 1
    # every step's kept count is the next one's input
    for a, b in zip(STEPS, STEPS[1:]):
        assert steps[a]["docs_kept"] == steps[b]["docs_in"]
    docs = [doc for part in outputs(d / "out").values() for doc in part]
    texts = [doc["text"] for doc in docs]
    assert len(docs) == report["docs_out"] == steps["near_dedup"]["docs_kept"]
    assert not any(planted["near"] == t or planted["short"] == t for t in texts)
    assert any("<EMAIL>" in t for t in texts) and not any("jane.doe@" in t for t in texts)
    assert {doc["lang"] for doc in docs} == {"en", "zh"}
    assert len({doc["id"] for doc in docs}) == len(docs)
    # examples name the document that was kept instead
    ex = steps["exact_dedup"]["examples"]["exact_duplicate"][0]
    assert ex["duplicate_of"] == "en-0"
    md = (d / "out" / "report.md").read_text()
    assert "| near_dedup |" in md and "near_duplicate 1" in md
    assert not (d / "out" / ".work").exists()


def test_cleaned_shards_feed_prepare(corpus, tmp_path):
    """The cleaned folders are ordinary jsonl sources for the tokenizer and prepare."""
    d, data, _, report = corpus
    cleaned = clean.cleaned_sources(data, d / "out")
    n = sum(len(list(iter_documents(s, "."))) for s in cleaned.sources)
    assert n == report["docs_out"]


def test_same_output_with_two_workers(corpus, tmp_path):
    d, data, _, report = corpus
    report2 = run_clean(data, tmp_path / "out2", num_workers=2)
    assert outputs(tmp_path / "out2") == outputs(d / "out")
    assert report2 == report


def _clean_cmd(recipe: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "lmforge", "clean", "--config", str(recipe), "--out", str(out)]


def _wait_for(pred, timeout=60.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_resume_after_kill_gives_the_same_output(corpus, tmp_path):
    d, data, _, _ = corpus
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "data:\n  sources:\n"
        + "".join(
            f"    - {{name: {s.name}, path: {s.path}, split_on: {s.split_on}, lang: {s.lang}}}\n"
            for s in data.sources
        )
        + f"clean:\n  steps: [{', '.join(STEPS)}]\n  languages: [en, zh]\n  shard_docs: 2\n"
        + "  num_workers: 1\n"
    )
    cmd = _clean_cmd(recipe, tmp_path)
    work = tmp_path / "clean" / ".work"
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert _wait_for(lambda: len(list(work.glob("*/*.stats.json"))) >= 3), "no shard finished"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    n_done = len(list(work.glob("*/*.stats.json")))
    assert not (tmp_path / "clean" / "report.json").exists(), "the run finished before the kill"
    # resumed with two workers: how shards are run is not part of what they hold
    r = subprocess.run(
        cmd + ["--num_workers", "2"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resuming: {n_done} of" in r.stdout
    uninterrupted = tmp_path / "fresh"
    run_clean(data, uninterrupted, shard_docs=2, num_workers=1)
    assert outputs(tmp_path / "clean") == outputs(uninterrupted)
    report = json.loads((tmp_path / "clean" / "report.json").read_text())
    assert report == json.loads((uninterrupted / "report.json").read_text())


def _bad_corpus(d: Path) -> DataConfig:
    good = _enwiki(3)
    lines = [json.dumps({"text": good[0]}), "{not json", json.dumps({"body": "no text field"})]
    lines += [json.dumps({"text": good[1]}), json.dumps({"text": 7}), json.dumps({"text": good[2]})]
    (d / "bad.jsonl").write_text("\n".join(lines) + "\n")
    (d / "blob.txt").write_bytes(b"fine first line\n" + bytes(range(256)) * 4 + b"\nlast line\n")
    return DataConfig(
        sources=[
            {"name": "bad", "path": str(d / "bad.jsonl")},
            {"name": "blob", "path": str(d / "blob.txt"), "split_on": "line"},
        ]
    )


def test_bad_input_stops_before_writing_anything(tmp_path):
    data = _bad_corpus(tmp_path)
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2 is not valid JSON"):
        run_clean(data, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*/part-*"))


def test_bad_input_is_reported_and_skipped_when_asked(tmp_path):
    data = _bad_corpus(tmp_path)
    report = run_clean(data, tmp_path / "out", skip_bad_rows=True, steps=["normalize"])
    problems = "\n".join(report["problems"])
    # 3 bad rows in bad.jsonl; the blob's bytes hold four '\n', making 5 unreadable lines
    assert report["n_problems"] == 3 + 5, problems
    assert "bad.jsonl: line 2 is not valid JSON" in problems
    assert "bad.jsonl: line 3 has no field 'text'" in problems
    assert "bad.jsonl: line 5: field 'text' is int" in problems
    assert "blob.txt: NUL byte at line 2, byte offset 16 (a binary file?)" in problems
    assert "blob.txt: invalid UTF-8 at line 3, byte offset 144 (byte 0x80)" in problems
    assert report["sources"]["bad"]["docs_out"] == 3
    blob = [d["text"] for d in outputs(tmp_path / "out")["blob/part-00000.jsonl.gz"]]
    assert blob[0] == "fine first line" and blob[-1] == "last line"
    assert "Unreadable input" in (tmp_path / "out" / "report.md").read_text()


def test_cli_clean_and_errors(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    recipe = tmp_path / "r.yaml"  # no clean section
    recipe.write_text(
        "data:\n  sources:\n    - {name: zh, path: datasets/chinese/zhwiki_sample.jsonl.gz}\n"
    )
    base = _clean_cmd(recipe, tmp_path)
    r = subprocess.run(base, cwd=REPO, capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "clean.steps is empty" in r.stderr
    r = subprocess.run(base + ["--help"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and "5% of words edited" in " ".join(r.stdout.split())
    r = subprocess.run(
        base + ["--steps", "normalize,qualty"], cwd=REPO, capture_output=True, text=True
    )
    assert r.returncode == 2 and "did you mean 'quality'" in r.stderr
    r = subprocess.run(
        base + ["--steps", "near_dedup,normalize"], cwd=REPO, capture_output=True, text=True
    )
    assert r.returncode == 2 and "must come after the per-document steps" in r.stderr


@pytest.mark.slow
def test_ray_executor_gives_the_same_output(corpus, tmp_path):
    pytest.importorskip("ray")
    d, data, _, report = corpus
    report_ray = run_clean(data, tmp_path / "ray", executor="ray", num_workers=2)
    assert outputs(tmp_path / "ray") == outputs(d / "out")
    assert report_ray == report


def test_recipe_with_a_clean_stage_feeds_the_tokenizer_cleaned_data(corpus, tmp_path):
    from lmforge import pipeline
    from lmforge.config import Recipe

    d, data, _, _ = corpus
    recipe = Recipe(data=data, clean=CleanConfig(steps=["normalize", "exact_dedup"]))
    with pytest.raises(DataError, match="run `lmforge clean` first"):
        pipeline.data_config(recipe, tmp_path)
    h = pipeline.stage_hashes(recipe)
    result = pipeline.run_stage(
        "clean",
        tmp_path,
        h["clean"],
        lambda out: clean.summary(clean.run(recipe.clean, data, ".", out)),
        log=lambda *a: None,
    )
    assert result["removed"] == {"normalize": 1, "exact_dedup": 1}  # boilerplate-only; a copy
    cleaned = pipeline.data_config(recipe, tmp_path)
    docs = [doc for s in cleaned.sources for doc in iter_documents(s, ".")]
    assert len(docs) == result["docs_out"]
    # the tokenizer's hash follows the clean config: a different clean means a new vocabulary
    other = Recipe(data=data, clean=CleanConfig(steps=["normalize"]))
    plain = Recipe(data=data)
    assert len({pipeline.stage_hashes(r)["tokenizer"] for r in (recipe, other, plain)}) == 3
    assert pipeline.stage_hashes(plain)["clean"] is None


def test_parquet_output_holds_the_same_documents(corpus, tmp_path):
    pytest.importorskip("pyarrow")
    d, data, _, report = corpus
    report_pq = run_clean(data, tmp_path / "pq", output_format="parquet")
    assert report_pq["docs_out"] == report["docs_out"]
    files = sorted((tmp_path / "pq").glob("*/part-*.parquet"))
    docs = [doc for f in files for doc in clean._read_docs(f, "parquet")]
    assert docs == [doc for part in outputs(d / "out").values() for doc in part]
    cleaned = clean.cleaned_sources(data, tmp_path / "pq")  # prepare reads parquet shards too
    assert sum(len(list(iter_documents(s, "."))) for s in cleaned.sources) == len(docs)


def test_a_missing_library_is_named_before_any_work(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "datasketch" else real(name, *a),
    )
    data = DataConfig(
        sources=[{"name": "zh", "path": str(REPO / "datasets/chinese/zhwiki_sample.jsonl.gz")}]
    )
    with pytest.raises(
        RuntimeError, match=r"near_dedup needs datasketch: pip install 'lmforge\[data\]'"
    ):
        run_clean(data, tmp_path / "out")
    assert not (tmp_path / "out").exists()
