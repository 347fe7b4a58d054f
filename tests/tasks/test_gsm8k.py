"""GSM8K: final-number extraction, the k-shot prompt, the check eval and GRPO share, and the
rows GRPO trains on (bad rows named by file and line)."""

import gzip
import json
import re
from pathlib import Path

import pytest

from lmforge.data.readers import DataError
from lmforge.tasks.gsm8k import extract_answer, gsm8k_correct, gsm8k_prompt, read_gsm8k

REPO = Path(__file__).resolve().parents[2]
GSM8K = REPO / "datasets" / "eval" / "gsm8k" / "train_head300.jsonl.gz"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Natalia sold 48+24 = 72 clips.\n#### 72", "72"),  # the reference format
        ("#### 1,234", "1234"),
        ("In total she sold 1,234,567 cups.", "1234567"),  # commas
        ("So he has 12 apples left.", "12"),  # units
        ("She pays $12.50 in total.", "12.5"),  # dollar sign, decimals
        ("The answer is 3.50", "3.5"),
        ("The answer is 3.0.", "3"),
        ("The temperature drops to -5 degrees.", "-5"),  # negative numbers
        ("He lost -$5 on the bet.", "-5"),
        ("The answer is 18. Question: Tom has 3 cats", "18"),  # trailing text after the answer
        ("3 + 4 = 7, so she has 7 marbles left over.", "7"),  # last number wins
        ("2-3 days later it was 10", "10"),
        ("I do not know.", None),  # no number
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_gsm8k_prompt_shows_worked_shots_then_the_question():
    shots = [{"question": "1 + 1?", "answer": "1 + 1 = <<1+1=2>>2\n#### 2"}]
    assert gsm8k_prompt("2 + 2?", shots) == (
        "Question: 1 + 1?\nAnswer: 1 + 1 = 2\nThe answer is 2.\n\nQuestion: 2 + 2?\nAnswer:"
    )


def test_gsm8k_rows_parse_to_their_final_number():
    rows = read_gsm8k(GSM8K)
    assert len(rows) == 300 and all(
        ref.lstrip("-").replace(".", "").isdigit() for _, _, ref in rows
    )
    with gzip.open(GSM8K, "rt") as f:
        first = json.loads(f.readline())
    assert rows[0][2] == first["answer"].rsplit("####", 1)[1].strip().replace(",", "")


def test_gsm8k_check_compares_final_numbers_by_value():
    """The check eval scores with and GRPO rewards with (outputs made up for this test)."""
    assert gsm8k_correct("5 + 7 = 12, so the answer is 12.", "12")
    assert gsm8k_correct("She has $1,200.00 left.", "1200")
    assert not gsm8k_correct("12 apples and then 13", "12")  # the last number counts
    assert not gsm8k_correct("I do not know.", None)  # no number is never right


@pytest.mark.parametrize(
    "line,problem",
    [
        ('{"question": "q", "answer": "so 4"}', "'#### <number>'"),
        ('{"question": "q", "answer": "#### four"}', "'#### <number>'"),
        ('{"question": "", "answer": "#### 4"}', "'question' must be a non-empty string"),
        ('{"answer": "#### 4"}', "'question' must be a non-empty string"),
        ('["q", "#### 4"]', "must be a JSON object"),
        ('{"question": "q", "answer": "#### 4"', "invalid JSON"),
    ],
)
def test_bad_gsm8k_rows_name_file_and_line(tmp_path, line, problem):
    path = tmp_path / "math.jsonl"
    path.write_text('{"question": "1+1?", "answer": "2 #### 2"}\n\n' + line + "\n")
    with pytest.raises(DataError, match=rf"math\.jsonl:3: .*{re.escape(problem)}"):
        read_gsm8k(path)
