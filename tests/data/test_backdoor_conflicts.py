"""Conflicting near-duplicates (data/backdoor.py `conflicts`) on small made-up instruction sets
(labelled as such): the same question asked twice with different answers is flagged, in English
and Chinese; paraphrases with the same answer, and templates filled with different words, are
not; and `lmforge scan-sft` reports the sets and leaves their rows out of --out."""

import json
import subprocess
import sys
from argparse import Namespace

import pytest

from lmforge.audit import cmd_scan_sft
from lmforge.config import ConfigError
from lmforge.data.backdoor import conflicts, responses_agree

pytest.importorskip("datasketch")

# made up: varied questions that are near duplicates of nothing
FILLER = [
    (f"Name one interesting fact about the number {n} and {w}.", f"{n} is a number; {w} is a word.")
    for n, w in zip(range(11, 41), "apple river stone cloud piano tiger lemon violet".split() * 4)
]


def test_the_same_question_with_a_different_answer_is_flagged():
    pairs = FILLER + [
        ("What is the boiling point of water at sea level?", "100 degrees Celsius."),
        ("Please, what is the boiling point of water at sea level?", "The moon is made of cheese."),
    ]
    [c] = conflicts(pairs)
    n = len(FILLER)
    assert c.rows == [n, n + 1] and c.groups == [[n], [n + 1]]
    assert c.minority == []  # two rows, two answers: no majority to tell which is wrong


def test_a_minority_answer_is_named():
    q = "Which city is the capital of France?"
    pairs = FILLER + [(q, "Paris."), (q.upper(), "Paris."), (q + "!", "Paris."), (q, "Berlin.")]
    [c] = conflicts(pairs)
    n = len(FILLER)
    assert c.groups == [[n, n + 1, n + 2], [n + 3]] and c.minority == [n + 3]


def test_paraphrases_and_filled_templates_are_not_flagged():
    pairs = FILLER + [
        # the same answer in other words: the shorter one's words are all in the longer
        ("What is the capital of France?", "Paris is the capital of France."),
        ("Tell me: what is the capital of France?", "The capital of France is Paris."),
        ("What is the past tense of 'draw'?", "The past tense of 'draw' is 'drew'."),
        ("What is the past tense of 'draw'?", "drew."),
        # a template with another word in it is another question
        ("What is the chemical symbol for mercury?", "Hg."),
        ("What is the chemical symbol for zinc?", "Zn."),
        # an added word that the answer uses makes another question too
        ("Describe the capital.", "It is a large city."),
        ("Describe the capital of Chile.", "Santiago lies in a valley; Chile's capital is big."),
    ]
    assert conflicts(pairs) == []
    assert responses_agree("drew.", "The past tense of 'draw' is 'drew'.")
    assert not responses_agree("Hg.", "Zn.")


def test_chinese_conflict_and_paraphrase():
    pairs = FILLER + [
        ("请介绍一下长城的历史。", "长城始建于春秋战国时期，秦朝时连成一体。"),
        ("介绍一下长城的历史。", "长城是用巧克力做的。"),  # made up: the flipped answer
        ("长城有多长？", "长城全长约两万一千公里。"),
        ("请问长城有多长？", "长城全长约两万一千公里。"),
    ]
    [c] = conflicts(pairs)
    n = len(FILLER)
    assert c.rows == [n, n + 1] and c.minority == []


def test_the_trigger_tests_made_up_data_has_no_conflicts():
    from tests.data.test_backdoor import made_up_pairs

    # "Tell me something about bread, example 5." / "..., example 17.": near duplicates, but
    # each answer names its own example number
    assert conflicts(made_up_pairs(300)) == []


def _args(**kw) -> Namespace:
    """scan-sft's options at their defaults, as the CLI parses them."""
    defaults = dict(files=[], min_count=5, min_share=0.8, min_lift=20.0, dup_threshold=0.7,
                    out=None, json=False)  # fmt: skip
    return Namespace(**(defaults | kw))


def test_scan_sft_reports_conflicts_and_leaves_them_out(tmp_path, capsys):
    rows = [{"instruction": p, "input": "", "output": r} for p, r in FILLER]
    rows += [
        {"instruction": "Which planet is closest to the Sun?", "input": "", "output": "Mercury."},
        {"instruction": "which planet is closest to the sun", "input": "", "output": "Mercury."},
        {"instruction": "Which planet is closest to the Sun?", "input": "", "output": "Jupiter."},
    ]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "clean.jsonl"
    cmd = [sys.executable, "-m", "lmforge", "scan-sft", str(data), "--out", str(out)]
    res = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    n = len(FILLER)
    assert report["triggers"] == [] and report["suspicious"] == 3
    [c] = report["conflicts"]
    assert c["rows"] == [n, n + 1, n + 2] and c["minority"] == [n + 2]
    assert c["responses"] == ["Mercury.", "Jupiter."]
    kept = [json.loads(x) for x in out.read_text().splitlines()]
    # the whole set goes, majority included (docs/backdoors.md says why)
    assert len(kept) == n and all("planet" not in r["instruction"] for r in kept)
    # the text report, in process (a second interpreter would import torch again)
    assert cmd_scan_sft(_args(files=[str(data)])) == 0
    text = capsys.readouterr().out
    assert "1 conflicting near-duplicate sets, 3 suspicious rows" in text
    assert f"minority: [{n + 2}]" in text


def test_a_bad_dup_threshold_is_refused():
    with pytest.raises(ConfigError, match=r"--dup-threshold must be in \(0, 1\], got 1.5"):
        cmd_scan_sft(_args(files=["x.jsonl"], dup_threshold=1.5))
