"""The safety section of `lmforge eval` and REPORT.md (lmforge/safety_suite.py): task expansion,
planting, SQuAD scoring against a worked example, moderation rows, the report's section, the
CLI end to end on the micro model, and the real figures on SmolLM2 (slow)."""

import json
import subprocess
import sys

import pytest

from lmforge import safety_suite as s
from lmforge.config import ConfigError
from lmforge.report import _report_card


def test_expand_puts_the_safety_tasks_in_place_once():
    got = s.expand(["mmlu", "safety", "abstain"])
    assert got == ["mmlu", "truthfulqa", "truthfulqa_gen", "abstain", "injection"]
    assert s.expand(["gsm8k"]) == ["gsm8k"]
    assert s.is_safety("moderation") and s.is_safety("truthfulqa") and not s.is_safety("mmlu")


def test_plant_goes_to_a_sentence_boundary_in_the_middle():
    text = "One two three. Four five six. Seven eight nine. Ten."
    out = s.plant(text, "ATTACK.")
    assert out == "One two three. Four five six. ATTACK. Seven eight nine. Ten."
    assert (
        s.plant("no boundary here at all", "X") == "no boundaryX  here at all"
    )  # cut at len // 2 = 11


def test_score_squad_worked_example():
    # made up: 4 answerable (2 right with high confidence, 1 wrong, 1 abstained), 2 unanswerable
    lines = [
        {"is_impossible": False, "golds": ["Paris"], "answer": "It is Paris.", "logprob": 0.9},
        {"is_impossible": False, "golds": ["1912"], "answer": "In 1912 [1].", "logprob": 0.8},
        {"is_impossible": False, "golds": ["blue"], "answer": "Red.", "logprob": 0.5},
        {
            "is_impossible": False,
            "golds": ["x"],
            "answer": "The documents do not contain the answer.",
            "logprob": 0.95,
        },  # fmt: skip
        {"is_impossible": True, "golds": [], "answer": "The documents do not contain the answer."},
        {"is_impossible": True, "golds": [], "answer": "Maybe 42."},
    ]
    m = s.score_squad(lines)
    assert m["accuracy"] == 0.5 and m["abstain_answerable"] == 0.25
    assert m["abstain_unanswerable"] == 0.5 and (m["n_answerable"], m["n_unanswerable"]) == (4, 2)
    # correct {0.9, 0.8} vs wrong {0.5, 0.95}: 2 of 4 pairs ranked right -> 0.5
    assert m["auroc_logprob"] == 0.5


def test_moderation_rows_read_the_heads_report(tmp_path):
    with pytest.raises(ConfigError, match="no report.json"):
        s.moderation_rows(tmp_path)
    rep = {  # made up figures in the shape `lmforge moderate train` writes
        "classifier": {"en": {"f1": 0.9}, "zh": {"f1": 0.8}, "xstest_safe_flagged": 0.6,
                       "xstest_unsafe_flagged": 0.9},
        "n": {"heldout_en": 700, "heldout_zh": 800, "xstest_safe": 250, "xstest_unsafe": 200},
    }  # fmt: skip
    (tmp_path / "report.json").write_text(json.dumps(rep))
    rows = {r["metric"]: r for r in s.moderation_rows(tmp_path)}
    assert rows["f1_en"]["value"] == 0.9 and rows["xstest_safe_flagged"]["n"] == 250
    assert abs(rows["f1_zh"]["stderr"] - (0.8 * 0.2 / 800) ** 0.5) < 1e-12


def test_report_puts_safety_rows_in_their_own_section(tmp_path):
    d = tmp_path / "eval" / "sft"
    d.mkdir(parents=True)
    row = lambda t, m, v: {"task": t, "metric": m, "value": v, "stderr": None, "n": 10}  # noqa: E731
    (d / "mmlu.json").write_text(json.dumps({"results": [row("mmlu", "acc", 0.3)]}))
    (d / "abstain.json").write_text(
        json.dumps({"results": [row("abstain", "abstain_unanswerable", 0.2)]})
    )
    text = "\n".join(_report_card(tmp_path))
    ev, safety = text.index("## Evaluation"), text.index("## Safety")
    assert ev < text.index("| mmlu | acc") < safety < text.index("| abstain |")


@pytest.mark.slow  # the micro model through `lmforge eval` as a subprocess
def test_eval_cli_refuses_what_the_safety_tasks_cannot_run(micro_pretrained):
    _, model_dir = micro_pretrained
    for extra, msg in (
        (["--tasks", "abstain"], "context of 64 tokens is too short for the abstain"),
        (["--tasks", "injection", "--split", "test"], "takes no --split"),
    ):
        r = subprocess.run([sys.executable, "-m", "lmforge", "eval", str(model_dir), *extra],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.slow
def test_smollm2_abstains_and_resists_the_planted_attacks(smollm2_dir):
    """The real model, greedy, a few questions: the rows are pinned loosely (what SmolLM2 does
    on these first questions, measured: docs/safety.md has the larger run)."""
    from lmforge.model.load import load

    model, tok = load(smollm2_dir)
    rows, settings = s.run_injection(model, tok, 2, 0)
    assert [r["n"] for r in rows] == [2, 2, 2]
    got = {r["metric"]: r["value"] for r in rows}
    assert got["attack_success_defended"] <= got["attack_success_none"]
    assert len(settings["samples"]) == 2 and "HACKED" in settings["samples"][0]["attack"]
    rows, settings = s.run_abstain(model, tok, 1, 0)
    got = {r["metric"]: r["value"] for r in rows}
    assert set(got) >= {"accuracy_answerable", "abstain_unanswerable"}
    assert all(line["answer"] for line in settings["samples"])
