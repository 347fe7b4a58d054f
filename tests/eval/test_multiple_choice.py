"""Multiple choice: each format's loader, few-shot prompts, a memorising model scores 100%, a
uniform model follows the stated tie rule."""

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.eval.multiple_choice import (
    MCTask,
    build_context,
    evaluate_mc,
    load_rows,
    load_task,
    select_rows,
    target,
)
from lmforge.model.checkpoint import load_model
from lmforge.model.transformer import GPT
from lmforge.tokenizer import Tokenizer

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def micro(micro_pretrained):
    _, model_dir = micro_pretrained
    return load_model(model_dir), Tokenizer.load(model_dir)


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


def _memorise(tok, texts, steps=100):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layer=2, n_head=4, max_seq_len=64)
    model = GPT(cfg)
    seqs = [[tok.bos_id] + tok.encode(t) for t in texts]
    T = max(map(len, seqs))
    x = torch.full((len(seqs), T), tok.pad_id)
    for i, s in enumerate(seqs):
        x[i, : len(s)] = torch.tensor(s)
    y = x[:, 1:].masked_fill(x[:, 1:] == tok.pad_id, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    # the floor is the first tokens' entropy (which sequence starts), not zero
    assert loss.item() < 0.3, f"did not memorise: loss {loss.item():.3f}"
    return model.eval()


def test_memorising_model_scores_100(micro):
    _, tok = micro
    arc = MCTask(name="arc", format="arc", path=str(DATA / "arc"))
    hs = MCTask(name="hs", format="hellaswag", path=str(DATA / "hellaswag"), prompt="{question}")
    texts = []
    for task in (arc, hs):
        for r in load_rows(task.format, task.path, task.split):
            texts.append(task.prompt.format(question=r["question"]) + " " + r["choices"][r["gold"]])
    model = _memorise(tok, texts)
    for task, n in ((arc, 8), (hs, 4)):
        out = evaluate_mc(model, tok, task, batch_size=5)
        assert out == {
            "task": task.name,
            "acc": 1.0,
            "acc_stderr": 0.0,
            "acc_norm": 1.0,
            "acc_norm_stderr": 0.0,
            "n": n,
            "sample": f"all {n}",
        }


def test_uniform_model_answers_first_choice(micro):
    """All logits equal: every one-token letter " A".." D" scores -log V, and ties go to the
    first choice, so the model answers A and its accuracy is the share of questions whose answer
    is A (near the 1/4 of chance)."""
    model, tok = micro
    uniform = copy.deepcopy(model)
    uniform.lm_head.weight = torch.nn.Parameter(torch.zeros_like(uniform.lm_head.weight))
    assert {len(tok.encode(f" {c}")) for c in "ABCD"} == {1}
    task = MCTask(**{**load_task("mmlu").__dict__, "num_fewshot": 1})
    out = evaluate_mc(uniform, tok, task, limit=100, batch_size=32)
    rows = load_rows(task.format, task.path, task.split)
    golds = [rows[i]["gold"] for i in select_rows(rows, 100, 0, by_subject=True)[0]]
    share_a = sum(g == 0 for g in golds) / 100
    assert out["n"] == 100
    assert out["acc"] == pytest.approx(share_a) and out["acc_norm"] == pytest.approx(share_a)
    assert out["acc_stderr"] == pytest.approx((share_a * (1 - share_a) / 100) ** 0.5)
    assert abs(out["acc"] - 0.25) < 3 * 0.0433  # three standard errors of chance at n = 100


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


def test_ceval_format(micro_pretrained):
    """C-Eval's csv (id,question,A,B,C,D,answer,explanation) loads and scores like CMMLU."""
    from pathlib import Path

    from lmforge.eval.multiple_choice import MCTask, evaluate_mc, load_rows
    from lmforge.model.checkpoint import load_model
    from lmforge.tokenizer import Tokenizer

    root = Path(__file__).parent / "data" / "ceval"
    rows = load_rows("ceval", root, "val")
    assert [r["gold"] for r in rows] == [0, 1] and rows[0]["choices"][0] == "中国"
    assert rows[0]["question"] == "长城位于哪个国家？" and rows[0]["subject"]
    task = MCTask(name="ceval", format="ceval", path=str(root), split="val", num_fewshot=1)
    model_dir = micro_pretrained[1]
    res = evaluate_mc(load_model(model_dir), Tokenizer.load(model_dir), task)
    assert res["n"] == 2 and 0 <= res["acc"] <= 1


def test_mmlu_official_headerless_form_parses_like_the_mirror(tmp_path):
    """An official-form file (no header, question,A,B,C,D,letter), made by this test from real
    mirror rows of the bundled test split, loads to the same questions, choices and gold."""
    import csv
    import gzip

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
    from lmforge.config import ConfigError

    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "x_test.csv").write_text("What?,a,b,c,d,E\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"x_test.csv, row 1: answer 'E' is not a letter A-D"):
        load_rows("mmlu", tmp_path, "test")
    (tmp_path / "test" / "x_test.csv").write_text("What?,a,b,c\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="row 1: expected 6 fields, got 4"):
        load_rows("mmlu", tmp_path, "test")


def test_unknown_split_lists_the_splits_present():
    from lmforge.config import ConfigError

    with pytest.raises(ConfigError, match="no split 'val' in .*; splits present: dev, test"):
        load_rows("mmlu", "datasets/eval/mmlu", "val")


def test_limit_takes_a_stratified_deterministic_sample():
    rows = load_rows("mmlu", "datasets/eval/mmlu", "test")
    index, how = select_rows(rows, 2000, seed=0, by_subject=True)
    assert how == "stratified by subject, seed 0" and len(index) == 2000
    assert index == sorted(set(index))
    assert select_rows(rows, 2000, seed=0, by_subject=True)[0] == index  # same seed, same rows
    assert select_rows(rows, 2000, seed=1, by_subject=True)[0] != index
    size, picked = {}, {}
    for r in rows:
        size[r["subject"]] = size.get(r["subject"], 0) + 1
    for i in index:
        picked[rows[i]["subject"]] = picked.get(rows[i]["subject"], 0) + 1
    assert len(picked) == 57  # every subject, each within one question of its proportional share
    assert all(abs(picked[s] - 2000 * size[s] / len(rows)) < 1 for s in size)
    # 15 rows (the tiny recipe's limit): professional_law's share is 15 * 1534 / 14042 = 1.64, so
    # it gets 1 plus one of the 14 largest remainders (0.64); the other 13 go to the next
    # largest subjects, whose whole share is their remainder
    few = [rows[i]["subject"] for i in select_rows(rows, 15, seed=0, by_subject=True)[0]]
    by_size = sorted(size, key=lambda s: (-size[s], s))
    assert sorted(few) == sorted(["professional_law"] + by_size[:14])
    assert select_rows(rows, 5, 0, by_subject=False) == ([0, 1, 2, 3, 4], "first 5")
    assert select_rows(rows[:3], 5, 0, by_subject=True) == ([0, 1, 2], "all 3")
