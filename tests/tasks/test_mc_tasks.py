"""Multiple-choice tasks: each format's loader, the bundled task files, and the few-shot prompts
every choice continues (lm-evaluation-harness's layout for MMLU)."""

import csv
import gzip
from pathlib import Path

import pytest

from lmforge.config import ConfigError
from lmforge.tasks.multiple_choice import MCTask, build_context, load_rows, load_task, target

DATA = Path(__file__).resolve().parents[1] / "eval" / "data"


def test_load_arc():
    rows = load_rows("arc", DATA / "arc", "dev")
    assert len(rows) == 8
    assert rows[0] == {
        "question": "Which gas do plants take in from the air to make food?",
        "choices": ["oxygen", "carbon dioxide", "nitrogen", "helium"],
        "gold": 1,
        "subject": "",
    }
    assert rows[7]["gold"] == 1  # answerKey "2" among numeric labels 1-4


def test_load_hellaswag():
    rows = load_rows("hellaswag", DATA / "hellaswag", "dev")
    assert [r["gold"] for r in rows] == [0, 1, 2, 0]
    assert rows[1]["question"] == "A man sprays soap on a red car. he"
    assert rows[1]["choices"][1] == "scrubs the car with a sponge."
    assert rows[1]["subject"] == "Washing a car"


@pytest.mark.parametrize("fmt,n_subjects", [("mmlu", 57), ("cmmlu", 67)])
def test_load_bundled_dev(fmt, n_subjects):
    rows = load_rows(fmt, f"datasets/eval/{fmt}", "dev")
    assert len(rows) == 5 * n_subjects
    assert len({r["subject"] for r in rows}) == n_subjects
    assert all(len(r["choices"]) == 4 and 0 <= r["gold"] < 4 and r["question"] for r in rows)
    if fmt == "mmlu":
        assert rows[0]["subject"] == "abstract_algebra" and rows[0]["gold"] == 1
    else:
        assert rows[0] == {
            "question": "肉牛屠宰后，胴体的哪个部位肉质较好",
            "choices": ["胸", "腹", "大腿", "小腿"],
            "gold": 2,
            "subject": "agronomy",
        }


def test_bundled_tasks_load_and_fewshot_excludes_the_question():
    for name in ("mmlu", "cmmlu", "arc_challenge", "hellaswag"):
        assert load_task(name).name == name
    task = MCTask(**{**load_task("mmlu").__dict__, "split": "dev", "num_fewshot": 4})
    rows = load_rows(task.format, task.path, task.split)
    ctx = build_context(task, rows[0], rows)
    assert ctx.startswith(
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    )
    assert ctx.count(rows[0]["question"]) == 1 and ctx.endswith("D. 3\nAnswer:")
    assert ctx.count("\nAnswer:") == task.num_fewshot + 1
    assert all(r["question"] not in ctx for r in rows[5:])  # other subjects stay out


def test_mmlu_prompt_is_lm_eval_harness_layout():
    """The default mmlu task: test split, the first 5 dev questions of the same subject, in
    lm-evaluation-harness's layout (tasks/mmlu/default/_default_template_yaml and
    _generate_configs.py), written out here by hand from the bundled rows."""
    task = load_task("mmlu")
    assert (task.split, task.fewshot_split, task.num_fewshot) == ("test", "dev", 5)
    test, dev = load_rows("mmlu", task.path, "test"), load_rows("mmlu", task.path, "dev")
    row = next(r for r in test if r["subject"] == "high_school_us_history")
    shots = [r for r in dev if r["subject"] == "high_school_us_history"]

    def lm_eval_text(r):  # "{{question.strip()}}\nA. {{choices[0]}}\n...D. ..\nAnswer:"
        a, b, c, d = r["choices"]
        return f"{r['question'].strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"

    expected = (
        "The following are multiple choice questions (with answers) about high school us history."
        "\n\n"
        + "\n\n".join(lm_eval_text(s) + " " + "ABCD"[s["gold"]] for s in shots)
        + "\n\n"
        + lm_eval_text(row)
    )
    assert len(shots) == 5 and build_context(task, row, dev) == expected
    assert [target(task, row, i) for i in range(4)] == [" A", " B", " C", " D"]


def test_arc_fewshot_draws_from_the_whole_pool():
    task = MCTask(name="arc", format="arc", path=str(DATA / "arc"), num_fewshot=2)
    rows = load_rows(task.format, task.path, task.split)
    ctx = build_context(task, rows[0], rows)
    expected = [
        "Question: What is the main source of energy for Earth's water cycle?\nAnswer: the Sun",
        "Question: Which object is a good conductor of electricity?\nAnswer: a copper wire",
        "Question: Which gas do plants take in from the air to make food?\nAnswer:",
    ]
    assert ctx == "\n\n".join(expected)


def test_mmlu_official_headerless_form_parses_like_the_mirror(tmp_path):
    """An official-form file (no header, question,A,B,C,D,letter), made by this test from real
    mirror rows of the bundled test split, loads to the same questions, choices and gold."""
    mirror = load_rows("mmlu", "datasets/eval/mmlu", "test")
    official = tmp_path / "test"
    official.mkdir()
    for subject in ("anatomy", "high_school_us_history"):  # the second has multi-line questions
        rows = [r for r in mirror if r["subject"] == subject]
        with gzip.open(
            official / f"{subject}_test.csv.gz", "wt", encoding="utf-8", newline=""
        ) as f:
            w = csv.writer(f)
            for r in rows:
                w.writerow([r["question"], *r["choices"], "ABCD"[r["gold"]]])
    parsed = load_rows("mmlu", tmp_path, "test")
    expected = [r for r in mirror if r["subject"] in ("anatomy", "high_school_us_history")]
    assert len(parsed) == len(expected) == 135 + 204
    assert parsed == expected


def test_mmlu_bad_answers_name_the_file_and_row(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "x_test.csv").write_text("What?,a,b,c,d,E\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"x_test.csv, row 1: answer 'E' is not a letter A-D"):
        load_rows("mmlu", tmp_path, "test")
    (tmp_path / "test" / "x_test.csv").write_text("What?,a,b,c\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="row 1: expected 6 fields, got 4"):
        load_rows("mmlu", tmp_path, "test")


def test_unknown_split_lists_the_splits_present():
    with pytest.raises(ConfigError, match="no split 'val' in .*; splits present: dev, test"):
        load_rows("mmlu", "datasets/eval/mmlu", "val")
