"""`lmforge agent` as a user runs it: a subprocess on a tiny random model (a forced first call,
the step limit, --json and --transcript), one-line errors, and SmolLM2 calling the calculator."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.io import atomic_dir
from lmforge.model.checkpoint import save_model
from lmforge.model.transformer import GPT
from lmforge.tokenizer_train import train_tokenizer


def lmforge(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lmforge", "agent", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
    """A random-weight model (made up for the test) with a ChatML tokenizer and a context long
    enough for the tool list, which the session's micro model (64 tokens) is not."""
    tmp = tmp_path_factory.mktemp("agent_tiny")
    text = ['a made-up corpus: the tool adds 12 + 30 = 42, then answers {"name": 1}.'] * 20
    train_tokenizer(text, vocab_size=300).save(tmp / "tok")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=320, dim=32, n_layer=1, n_head=2, max_seq_len=4096)
    with atomic_dir(tmp / "model") as out:
        save_model(GPT(cfg).eval(), out, tokenizer_dir=tmp / "tok")
    return tmp / "model"


def test_forced_call_step_limit_transcript_and_json(tiny_chat_model, tmp_path):
    pytest.importorskip("llguidance", reason="a forced call is constrained by llguidance")
    dest = tmp_path / "t.jsonl"
    r = lmforge(
        tiny_chat_model, "What is 12 + 30?", "--tool-choice", "required-first",
        "--max-steps", 1, "--max-new-tokens", 400, "--transcript", dest,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout == "(no answer within 1 step; see the transcript for the calls made)\n"
    transcript = [json.loads(line) for line in dest.read_text().splitlines()]
    assert [e["role"] for e in transcript] == ["system", "user", "assistant", "tool", "agent"]
    call, result = transcript[2], transcript[3]
    assert call["forced"] and call["tool_calls"][0]["function"]["name"] == "calculator"
    # the grammar held the random model to the tool's schema: the call ran
    assert "expression" in json.loads(result["arguments"])
    assert transcript[-1] == {"step": 1, "role": "agent", "stopped": "step_limit"}

    r = lmforge(tiny_chat_model, "q", "--max-steps", 1, "--max-new-tokens", 4, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)  # unforced, 4 tokens cannot make a call: a text answer at once
    assert (out["steps"], out["stopped"]) == (1, "answer") and isinstance(out["answer"], str)


def test_errors_are_one_line(tiny_chat_model, tmp_path):
    for args, message in [
        (["--tools", "calculator,shell"], "--tools: unknown tool 'shell'"),
        (["--tools", "rag"], "--tools rag needs --index INDEX"),
        (["--tools", "rag", "--index", tmp_path / "none"], "no such folder"),
        (["--max-steps", 0], "--max-steps must be >= 1, got 0"),
    ]:
        r = lmforge(tiny_chat_model, "q", *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert r.stderr.startswith("lmforge agent: error: ") and message in r.stderr, r.stderr


@pytest.mark.slow
def test_smollm2_calls_the_calculator(smollm2_dir):
    """SmolLM2-135M-Instruct, greedy, its first step forced to a calculator call: the call
    parses, runs without error, and its result is what the calculator says."""
    pytest.importorskip("llguidance", reason="a forced call is constrained by llguidance")
    from lmforge.agent.tools import calculator
    from lmforge.infer.untrusted import spotlight

    r = lmforge(
        smollm2_dir, "What is 123 * 45?", "--tool-choice", "required-first",
        "--max-steps", 2, "--max-new-tokens", 48, "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    tool = next(e for e in json.loads(r.stdout)["transcript"] if e["role"] == "tool")
    assert tool["error"] is False
    # the default --defence both: the result reaches the model spotlighted as data
    assert tool["content"] == spotlight(calculator(json.loads(tool["arguments"])["expression"]))
