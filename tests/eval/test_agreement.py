"""benchmarks/eval_agreement.py: the parts that need neither lm-eval nor a model (task files
written from our samples, the question-by-question comparison). All data here is made up."""

import importlib.util
import json
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location(
        "eval_agreement", REPO / "benchmarks" / "eval_agreement.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ea = _module()


def test_mmlu_rows_read_in_both_csv_forms(tmp_path):
    mirror = tmp_path / "x_dev.csv"
    mirror.write_text("question,choice0,choice1,choice2,choice3,answer\nQ?,a,b,c,d,2\n")
    official = tmp_path / "y_dev.csv"
    official.write_text("Q?,a,b,c,d,C\n")
    want = [{"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": 2}]
    assert ea._read_csv_rows(mirror) == want == ea._read_csv_rows(official)


def test_mmlu_tasks_one_per_subject_with_our_rows(tmp_path):
    dev = tmp_path / "dev"
    dev.mkdir()
    for s in ("anatomy", "high_school_physics"):
        (dev / f"{s}_dev.csv").write_text(
            "question,choice0,choice1,choice2,choice3,answer\nD?,a,b,c,d,1\n"
        )
    samples = [  # made-up questions, as `lmforge eval --log-samples` logs them
        {"index": 7, "subject": "anatomy", "question": "Q1 ", "choices": list("wxyz"), "gold": 3},
        {"index": 90, "subject": "high_school_physics", "question": "Q2", "choices": list("abcd"), "gold": 0},
    ]  # fmt: skip
    out = tmp_path / "tasks"
    out.mkdir()
    names = ea.mmlu_tasks(samples, dev, Path("/lm_eval"), out)
    assert names == ["agree_mmlu_anatomy", "agree_mmlu_high_school_physics"]
    cfg = yaml.safe_load((out / "agree_mmlu_high_school_physics.yaml").read_text())
    assert cfg["include"] == "/lm_eval/tasks/mmlu/default/_default_template_yaml"
    assert cfg["description"].endswith("about high school physics.\n\n")
    test = [json.loads(x) for x in Path(cfg["dataset_kwargs"]["data_files"]["test"]).open()]
    assert test == [{"index": 90, "question": "Q2", "choices": list("abcd"), "answer": 0}]


def test_compare_choices_counts_agreement_and_lists_flips():
    ours = [(0, [-1.0, -2.0], 0), (1, [-1.0, -1.0002], 1), (2, [-3.0, -1.0], 1)]
    theirs = [(0, [-1.0, -2.0], 0), (1, [-1.0003, -1.0001], 1), (2, [-3.0, -1.0], 1)]
    r = ea.compare_choices("mmlu", ours, theirs)
    assert (r["n"], r["ours"], r["theirs"]) == (3, 2 / 3, 1.0)
    assert r["identical"] == 2 / 3
    (flip,) = r["disagreements"]
    assert (flip["index"], flip["ours"], flip["theirs"]) == (1, 0, 1)
    assert flip["our_margin"] < ea.NEAR_TIE and flip["their_margin"] < ea.NEAR_TIE


def test_gsm8k_numbers_compare_by_value():
    assert ea._number("$1,234.") == ea._number("1234") == "1234"
    assert ea._number("18.50") == ea._number("18.5")
    assert ea._number(None) is None and ea._number("[invalid]") is None
