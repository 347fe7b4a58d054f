"""benchmarks/ppo_abstain.py: the PPO prompt rows built from SQuAD v2, their train/held-out
split, and the before/after figures. Every row and answer here is made up."""

import importlib.util
import sys
from pathlib import Path

import pytest

from lmforge.align.ppo import row_to_prompt
from lmforge.tasks.qa import UNANSWERABLE, qa_check

REPO = Path(__file__).resolve().parents[2]


def _module():
    sys.path.insert(0, str(REPO / "benchmarks"))  # the script imports its sibling common.py
    spec = importlib.util.spec_from_file_location("ppo_abstain", REPO / "benchmarks/ppo_abstain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


PASSAGE = {"id": "p0", "title": "Rivers", "text": "The Oder flows into the Baltic Sea."}


def _squad(qid, title, impossible, golds=()):
    """A made-up row in the layout of datasets/rag/qa/squad_v2_dev_qa.jsonl.gz."""
    return {"id": qid, "passage_id": "p0", "title": title, "question": f"Question {qid}?",
            "answers": [{"text": g, "answer_start": 0} for g in golds],
            "is_impossible": impossible}  # fmt: skip


def test_answerable_row_keeps_the_shortest_gold_and_ppo_reads_it():
    m = _module()
    row = m.prompt_row(_squad("q1", "Rivers", False, ["the Baltic Sea", "Baltic Sea "]), PASSAGE)
    assert row["answer"] == "Baltic Sea" and row["answerable"]
    assert row["question"].startswith(m.INSTRUCTION)
    assert PASSAGE["text"] in row["question"] and row["question"].endswith("Question q1?")
    p = row_to_prompt(row, "qa")
    assert p.answer == "Baltic Sea" and p.messages[-1]["content"] == row["question"]
    assert qa_check("Into the Baltic Sea.", p.answer) == "correct"
    assert qa_check("I don't know.", p.answer) == "abstain"


def test_unanswerable_row_rewards_the_abstention():
    m = _module()
    row = m.prompt_row(_squad("q2", "Rivers", True), PASSAGE)
    assert row["answer"] == UNANSWERABLE and not row["answerable"]
    p = row_to_prompt(row, "qa")
    assert qa_check("I don't know.", p.answer) == "correct"
    assert qa_check("The Baltic Sea.", p.answer) == "wrong"


def test_answerable_row_without_gold_is_an_error():
    with pytest.raises(ValueError, match="q3: answerable but has no gold answer"):
        _module().prompt_row(_squad("q3", "Rivers", False), PASSAGE)


def test_split_holds_out_a_whole_article_balanced_and_interleaved():
    m = _module()
    rows = [m.prompt_row(_squad(f"a{i}", "A", i % 2 == 0, ["x"]), PASSAGE) for i in range(6)]
    rows += [m.prompt_row(_squad(f"b{i}", "B", i < 4, ["y"]), PASSAGE) for i in range(7)]
    train, evals = m.split_rows(rows, "B", per_class=2)
    assert {r["title"] for r in train} == {"A"} and len(train) == 6
    assert [r["answerable"] for r in evals] == [True, False, True, False]
    with pytest.raises(SystemExit, match="3 answerable and 4 unanswerable"):
        m.split_rows(rows, "B", per_class=4)
    with pytest.raises(SystemExit, match="'C'"):
        m.split_rows(rows, "C", per_class=1)


def test_score_splits_answerable_and_unanswerable():
    m = _module()
    rows = [{"answer": "Paris", "answerable": True}, {"answer": "Rome", "answerable": True},
            {"answer": "Oslo", "answerable": True}, {"answer": "Bern", "answerable": True},
            {"answer": UNANSWERABLE, "answerable": False},
            {"answer": UNANSWERABLE, "answerable": False}]  # fmt: skip
    answers = ["Paris.", "I don't know.", "Lima", "Bern", "I don't know.", "Lima"]
    assert m.score(rows, answers) == {
        "answerable_correct": 0.5, "answerable_abstain": 0.25, "answerable_wrong": 0.25,
        "n_answerable": 4, "unanswerable_abstain": 0.5, "unanswerable_wrong": 0.5,
        "n_unanswerable": 2,
    }  # fmt: skip
