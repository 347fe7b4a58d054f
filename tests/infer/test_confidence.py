"""Confidence per answer: mean token logprob, self-consistency, and AUROC (infer/confidence.py)."""

import math

import pytest
import torch

from lmforge.config import ConfigError, ModelConfig
from lmforge.infer.confidence import (
    agreement,
    answer_logprobs,
    answer_with_confidence,
    auroc,
    logprob_confidence,
    same_answer,
    self_consistency,
)
from lmforge.model.transformer import GPT


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=64, dim=32, n_layer=2, n_head=2, max_seq_len=32)).eval()


def test_answer_logprobs_match_a_hand_computation(tiny):
    prompt, answer = [1, 5, 9], [3, 7, 2]
    got = answer_logprobs(tiny, prompt, answer)
    # by hand: the logits of the full sequence, position t predicts token t + 1, one at a time
    with torch.no_grad():
        logits = tiny(torch.tensor([prompt + answer]))[0]
    want = []
    for j, tok in enumerate(answer):
        row = logits[len(prompt) - 1 + j].double()
        want.append((row[tok] - torch.logsumexp(row, 0)).item())
    assert got == pytest.approx(want, abs=1e-5)
    conf = logprob_confidence(got)
    assert conf["mean_logprob"] == pytest.approx(sum(want) / 3, abs=1e-5)
    assert conf["score"] == pytest.approx(math.exp(sum(want) / 3), rel=1e-5)
    assert conf["tokens"] == 3 and 0 < conf["score"] <= 1


def test_logprob_of_the_greedy_answer_equals_generation_logprobs(tiny):
    """The teacher-forced score of a generated answer is what the engine reports per token."""
    from lmforge.infer.engine import Engine, SamplingParams

    eng = Engine(tiny, None, max_batch=1)
    req = eng.submit([1, 5, 9], SamplingParams(max_tokens=6, logprobs=True))
    eng.run_until_done()
    assert req.logprobs == pytest.approx(answer_logprobs(tiny, [1, 5, 9], req.output_ids), abs=1e-4)


def test_answer_logprobs_bad_input(tiny):
    with pytest.raises(ConfigError, match="non-empty prompt and answer"):
        answer_logprobs(tiny, [1], [])
    with pytest.raises(ConfigError, match="the model's context is 32"):
        answer_logprobs(tiny, list(range(30)), [1, 2, 3])
    assert logprob_confidence([])["score"] is None


def test_same_answer():
    assert same_answer("Paris", "It is Paris.")
    assert same_answer("The Eiffel Tower", "eiffel tower!")
    assert not same_answer("Paris", "Parisian food")  # whole words only
    assert not same_answer("Paris", "London")
    assert same_answer("", "") and not same_answer("", "Paris")
    # wordy answers sharing most words agree (F1 0.8); sharing one word of four does not
    assert same_answer("Normans came from Norway", "The Normans came from Denmark")
    assert not same_answer("They came in 1066", "Rollo led them")
    # a known weakness: filler words count, "It was in 1066" vs "It was Rollo" has F1 0.57
    assert same_answer("It was in 1066", "It was Rollo")


def test_self_consistency_on_a_scripted_sampler():
    # a made-up sampler: five scripted answers, three of which say "Paris"
    script = ["Paris.", "the capital is Paris", "London", "Paris", "Lyon"]
    calls = []

    def sample(i):
        calls.append(i)
        return script[i]

    out = self_consistency("Paris", sample, k=5)
    assert out == {"method": "self_consistency", "score": 0.6, "samples": 5, "agreeing": 3}
    assert calls == [0, 1, 2, 3, 4]  # each sample gets its own seed offset
    assert agreement("London", script) == pytest.approx(0.2)
    with pytest.raises(ConfigError, match="k >= 1"):
        self_consistency("Paris", sample, k=0)


def test_auroc_worked_examples():
    # perfect ranking, reversed ranking, and chance
    assert auroc([0.9, 0.8, 0.2, 0.1], [True, True, False, False]) == 1.0
    assert auroc([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == 0.0
    # by hand: pairs (correct, wrong) = (0.9, 0.5) win, (0.9, 0.3) win, (0.4, 0.5) lose,
    # (0.4, 0.3) win -> 3 of 4
    assert auroc([0.9, 0.5, 0.4, 0.3], [True, False, True, False]) == 0.75
    # ties count one half: correct 0.5 vs wrong 0.5 tie, correct 0.5 vs wrong 0.2 win,
    # correct 0.8 beats both -> (0.5 + 1 + 1 + 1) / 4
    assert auroc([0.5, 0.8, 0.5, 0.2], [True, True, False, False]) == 0.875
    assert auroc([0.3] * 4, [True, False, True, False]) == 0.5


def test_auroc_bad_input():
    with pytest.raises(ConfigError, match="at least one correct and one wrong"):
        auroc([0.1, 0.2], [True, True])
    with pytest.raises(ConfigError, match="2 scores but 3 labels"):
        auroc([0.1, 0.2], [True, False, True])


def test_answer_with_confidence_micro(micro_pretrained):
    from lmforge.model.load import load

    model, tok = load(micro_pretrained[1], device="cpu")
    ids = [tok.bos_id, *tok.encode("Once upon a time")]
    text, conf = answer_with_confidence(model, tok, ids, "logprob", max_new_tokens=5)
    assert conf["method"] == "logprob" and 0 < conf["score"] <= 1 and conf["tokens"] >= 1
    same, sc = answer_with_confidence(model, tok, ids, "self_consistency", k=3, max_new_tokens=5)
    assert same == text and sc["samples"] == 3 and sc["score"] in (0, 1 / 3, 2 / 3, 1)
    with pytest.raises(ConfigError, match="unknown"):
        answer_with_confidence(model, tok, ids, "vibes")


def test_generate_cli_prints_the_confidence(micro_pretrained):
    import json
    import subprocess
    import sys

    def run(*args):
        cmd = [sys.executable, "-m", "lmforge", "generate", str(micro_pretrained[1]), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    r = run("--prompt", "Once upon a time", "--max-new-tokens", "5", "--confidence", "logprob")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Once upon a time")
    conf = json.loads(r.stderr.strip().splitlines()[-1])["confidence"]
    assert conf["method"] == "logprob" and 0 < conf["score"] <= 1
    r = run("--prompt", "Hi", "--confidence", "self_consistency", "--samples", "0")
    assert r.returncode != 0 and "--samples must be >= 1, got 0" in r.stderr
    assert "Traceback" not in r.stderr
