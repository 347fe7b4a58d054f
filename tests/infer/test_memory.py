"""Conversation memory (infer/memory.py): the window, the summary and the retrieval notes, and
`lmforge chat --memory`. The summariser here is a made-up fake (no model), so every test is
deterministic and fast; the real model's summaries are measured in benchmarks/memory.py."""

import re
import subprocess
import sys

import pytest

from lmforge.config import ConfigError
from lmforge.infer import memory as mem
from lmforge.infer.chat import fit_history, run_chat
from lmforge.infer.memory import NOTE_HEAD, STRATEGIES, check_strategy, make_memory, prompt_len
from lmforge.tokenizer import Tokenizer

SYSTEM = {"role": "system", "content": "Be brief."}
# a made-up conversation: the fact (a locker code) in turn 2, then small talk, then the question
FACT = "My locker code is zebra42."
SMALL_TALK = [
    ("How do I boil an egg?", "Put it in boiling water for nine minutes."),
    ("Why is the sea salty?", "Rivers carry minerals into it."),
    ("What is a good snack?", "Fruit or nuts."),
    ("How do I water a cactus?", "Rarely, when the soil is dry."),
    ("What makes bread rise?", "Yeast makes gas in the dough."),
    ("Any tips for sleep?", "Keep a regular bedtime."),
    ("How do bees make honey?", "From nectar, stored in the hive."),
    ("Why do leaves fall?", "Trees shed them before winter."),
]
QUESTION = {"role": "user", "content": "What is my locker code?"}


def conversation() -> list[dict]:
    turns = [("Hello!", "Hi, how can I help?"), (FACT, "Noted."), *SMALL_TALK]
    msgs = [SYSTEM]
    for user, reply in turns:
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return msgs + [QUESTION]


class FakeSummariser:
    """A made-up summariser (no model): records each prompt and answers `S<n>`."""

    def __init__(self):
        self.prompts: list[str] = []

    def __call__(self, messages: list[dict]) -> str:
        self.prompts.append(messages[-1]["content"])
        return f"S{len(self.prompts)}"


@pytest.fixture(scope="module")
def tok(micro_prepared):
    return Tokenizer.load(micro_prepared[1] / "tokenizer")


def test_drop_is_fit_history(tok):
    msgs = conversation()
    fitted = make_memory("drop").fit(tok, msgs, 120)
    kept, dropped = fit_history(tok, msgs, 120)
    assert fitted.messages == fitted.kept == kept and fitted.dropped == dropped > 0
    assert fitted.note == ""


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("budget", [90, 160, 260])
def test_budget_respected_system_prompt_and_question_kept(tok, name, budget):
    msgs = conversation()
    assert prompt_len(tok, msgs) > 260  # the conversation does not fit any of the budgets
    fitted = make_memory(name, FakeSummariser()).fit(tok, msgs, budget)
    assert prompt_len(tok, fitted.messages) <= budget
    assert fitted.messages[0]["role"] == "system"
    assert fitted.messages[0]["content"].startswith(SYSTEM["content"])
    assert fitted.messages[-1] == QUESTION
    assert fitted.kept == msgs[:1] + msgs[1 + fitted.dropped :]  # the window is the newest turns


@pytest.mark.parametrize("bm25s", [True, False], ids=["bm25s", "term-overlap"])
def test_retrieve_brings_back_the_turn_holding_the_fact(tok, monkeypatch, bm25s):
    if bm25s:
        pytest.importorskip("bm25s", reason="the rag extra (bm25s) is not installed")
    else:
        monkeypatch.setattr(mem, "bm25s_or_none", lambda: None)
    msgs = conversation()
    fitted = make_memory("retrieve").fit(tok, msgs, 160)
    fact_at = msgs.index({"role": "user", "content": FACT})
    assert fitted.dropped > fact_at  # the fact fell out of the window...
    assert fitted.retrieved == [fact_at]  # ...and came back, alone (the small talk does not match)
    assert fitted.note.startswith(NOTE_HEAD) and "zebra42" in fitted.note
    assert "zebra42" in fitted.messages[0]["content"]
    assert f"retrieved={fact_at}" in fitted.describe()


def test_retrieve_brings_nothing_back_for_an_unrelated_question(tok):
    """...and then keeps no room for a note: the window is drop's, store or no store."""
    volcanoes = {"role": "user", "content": "Tell me about volcanoes."}
    msgs = conversation()[:-1] + [volcanoes]
    memory = make_memory("retrieve")
    fitted = memory.fit(tok, msgs, 160)
    assert fitted.dropped and fitted.retrieved == [] and fitted.note == ""
    assert fitted.messages == fitted.kept == fit_history(tok, msgs, 160)[0]
    glaciers = {"role": "user", "content": "And glaciers?"}
    later = fitted.kept + [{"role": "assistant", "content": "Hot rock."}, glaciers]
    again = memory.fit(tok, later, 160)  # the store is not empty now
    assert memory.docs and again.note == ""
    assert again.messages == fit_history(tok, later, 160)[0]


def test_summary_is_cached_and_updated_turn_by_turn(tok):
    """Played as `lmforge chat` plays it: the history keeps only the window, so every message
    that falls out reaches the summariser exactly once, with the summary so far."""
    msgs, fake = conversation(), FakeSummariser()
    memory = make_memory("summary", fake)
    history, folded = [SYSTEM], 0
    for k in range(1, len(msgs), 2):
        history.append(msgs[k])
        fitted = memory.fit(tok, history, 140)
        history = fitted.kept
        folded += fitted.summarised
        if k + 1 < len(msgs):
            history.append(msgs[k + 1])
    assert len(fake.prompts) >= 2  # summarised as the turns fell out, not all at once
    seen = "\n".join(fake.prompts)
    for m in msgs[1 : 1 + folded]:
        assert seen.count(m["content"]) == 1, m  # each fallen-out message read once
    for n, prompt in enumerate(fake.prompts[1:], 1):
        assert f"(Summary of what came before: S{n})" in prompt  # re-summarised with the last one
    assert fitted.note == f"{NOTE_HEAD} S{len(fake.prompts)}"
    assert fitted.messages[0]["content"] == f"{SYSTEM['content']}\n\n{fitted.note}"
    assert memory.calls == len(fake.prompts)
    memory.reset()
    assert memory.fit(tok, [SYSTEM, QUESTION], 140).note == ""  # /reset forgets the summary


def test_summary_chunks_a_long_fold(tok):
    """The server folds everything at once: the transcript goes in chunks of input_tokens."""
    fake = FakeSummariser()
    memory = mem.SummaryMemory(fake, input_tokens=40)
    fitted = memory.fit(tok, conversation(), 120)
    assert len(fake.prompts) > 1 and fitted.summarised == fitted.dropped


def test_a_bad_strategy_is_a_clear_error():
    with pytest.raises(ConfigError, match="--memory must be one of drop, summary, retrieve"):
        check_strategy("forget")
    with pytest.raises(ConfigError, match="needs a summariser"):
        make_memory("summary")
    out = subprocess.run(
        [sys.executable, "-m", "lmforge", "chat", "some/model", "--memory", "forget"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "--memory: invalid choice: 'forget'" in out.stderr
    assert "Traceback" not in out.stderr


def test_chat_loop_tells_what_fell_out_and_brings_it_back(micro_pretrained):
    """run_chat with the micro model (64 tokens of context) and the retrieve memory."""
    from lmforge.model.load import load

    model, tok = load(micro_pretrained[1], device="cpu")
    lines = iter([FACT] + [u for u, _ in SMALL_TALK[:4]] + [QUESTION["content"], "/quit"])
    shown: list[str] = []
    memory = make_memory("retrieve")
    run_chat(
        model, tok, reserve=4, read=lambda _: next(lines), write=shown.append, memory=memory,
        max_new_tokens=4, temperature=0,
    )  # fmt: skip
    out = "".join(shown)
    assert re.search(r"context full: set the \d+ oldest messages aside for retrieval", out)
    assert "(brought back earlier messages 0)" in out  # the fact, message 0 (no system prompt)
    assert memory.docs[0][0] == 0 and memory.docs[0][1].startswith(f"User: {FACT}\nAssistant:")


@pytest.mark.slow
def test_smollm2_summariser_is_greedy_and_bounded(smollm2_dir):
    """The real summariser on two made-up turns: a non-empty summary within the note's tokens,
    the same twice (greedy). Its quality is benchmarks/memory.py's business (SmolLM2-135M
    often loses the fact)."""
    from lmforge.model.load import load

    model, tok = load(smollm2_dir, device="cpu")
    summaries = []
    for _ in range(2):
        memory = make_memory("summary", mem.model_summariser(model, tok, max_new_tokens=40))
        memory.note_tokens = 24
        memory.absorb(tok, conversation()[1:5], 1)
        summaries.append(memory.summary)
        assert memory.calls == 1 and memory.summary
        assert len(tok.encode(memory.summary)) <= 24
    assert summaries[0] == summaries[1]
