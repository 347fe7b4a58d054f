"""Distillation: the loss against a hand computation, the student's shape, a short run end to end
(student and baseline load, share their start) and exact resume after a real Ctrl-C."""

import json
import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lmforge.compress import distill
from lmforge.compress.distill import distill_loss, student_config
from lmforge.config import ARCH_FEATURES, ConfigError, DistillConfig, ModelConfig
from lmforge.model.checkpoint import load_model
from lmforge.train.metrics import read_metrics


def _hand(student, teacher, targets, T, alpha):
    """The loss with plain Python floats, one token at a time."""

    def log_softmax(row, temp):
        z = [v / temp for v in row]
        m = max(z)
        lse = m + math.log(sum(math.exp(v - m) for v in z))
        return [v - lse for v in z]

    kl = ce = 0.0
    for s, t, y in zip(student, teacher, targets):
        ls, lt = log_softmax(s, T), log_softmax(t, T)
        kl += sum(math.exp(a) * (a - b) for a, b in zip(lt, ls))
        ce -= log_softmax(s, 1.0)[y]
    kl, ce = kl / len(targets), ce / len(targets)
    return alpha * T * T * kl + (1 - alpha) * ce, kl, ce


def test_distill_loss_matches_a_hand_computation():
    student = [[1.0, -0.5, 2.0, 0.3], [0.2, 0.1, -1.0, 1.5], [3.0, 0.0, 0.5, -2.0]]
    teacher = [[2.0, 0.5, 1.0, -0.3], [0.0, 0.4, -0.2, 2.5], [1.0, 1.0, 0.5, 0.0]]
    targets = [2, 3, 0]
    s = torch.tensor(student, dtype=torch.float64).view(1, 3, 4)  # (B, T, V)
    t = torch.tensor(teacher, dtype=torch.float64).view(1, 3, 4)
    y = torch.tensor(targets).view(1, 3)
    for T, alpha in [(2.0, 0.5), (1.0, 0.3), (4.0, 0.9)]:
        loss, kl, ce = distill_loss(s, t, y, T, alpha)
        want = _hand(student, teacher, targets, T, alpha)
        for got, ref in zip((loss, kl, ce), want):
            assert got.item() == pytest.approx(ref, rel=1e-6)


def test_distill_loss_ends_are_ce_and_scaled_kl():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    y = torch.randint(0, 11, (2, 5))
    loss, _, _ = distill_loss(s, t, y, temperature=3.0, alpha=0.0)
    torch.testing.assert_close(loss, F.cross_entropy(s.flatten(0, 1), y.flatten()))
    loss, kl, _ = distill_loss(s, t, y, temperature=3.0, alpha=1.0)
    p_t = F.softmax(t / 3, -1)
    ref = (p_t * (p_t.log() - F.log_softmax(s / 3, -1))).sum(-1).mean()
    torch.testing.assert_close(loss, 9 * ref)
    torch.testing.assert_close(kl, ref)
    for T in (1.0, 2.0):  # the student's gradient is the textbook formula's
        s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
        distill_loss(s1, t, y, temperature=T, alpha=0.3)[0].backward()
        log_q_s, log_q_t = F.log_softmax(s2 / T, -1), F.log_softmax(t / T, -1)
        kl = F.kl_div(log_q_s, log_q_t, log_target=True, reduction="sum") / 10  # 10 tokens
        ce = F.cross_entropy(s2.flatten(0, 1), y.flatten())
        (0.3 * T * T * kl + 0.7 * ce).backward()
        torch.testing.assert_close(s1.grad, s2.grad)
    same, kl_same, _ = distill_loss(t, t, y, temperature=2.0, alpha=1.0)
    assert abs(kl_same.item()) < 1e-6  # a student equal to its teacher has nothing to learn


def test_student_shape_follows_the_teacher_and_bad_shapes_are_named():
    teacher = ModelConfig(vocab_size=100, dim=96, n_layer=3, n_head=6, n_kv_head=2, max_seq_len=64)
    s = student_config(teacher, DistillConfig(dim=64))
    assert (s.dim, s.n_layer, s.n_head, s.n_kv_head, s.head_dim) == (64, 3, 4, 4, 16)
    assert s.ffn_dim == 192 and s.vocab_size == 100 and s.max_seq_len == 64  # 8/3 * 64 -> 192
    s = student_config(teacher, DistillConfig(dim=64, n_layer=1, n_head=2, n_kv_head=1, ffn_dim=80))
    assert (s.n_layer, s.n_head, s.n_kv_head, s.head_dim, s.ffn_dim) == (1, 2, 1, 32, 80)
    with pytest.raises(ConfigError, match="head width"):
        student_config(teacher, DistillConfig(dim=40))
    with pytest.raises(ConfigError, match=r"dim \(64\) must be divisible by distill.n_head \(3\)"):
        student_config(teacher, DistillConfig(dim=64, n_head=3))
    with pytest.raises(ConfigError, match="n_kv_head"):
        student_config(teacher, DistillConfig(dim=64, n_head=4, n_kv_head=3))
    gpt2 = ModelConfig(vocab_size=100, dim=64, n_head=4, arch="gpt2", **ARCH_FEATURES["gpt2"])
    with pytest.raises(ConfigError, match="student's shape"):  # GPT-2 has no GQA
        student_config(gpt2, DistillConfig(dim=32, n_head=2, n_kv_head=1))


CFG = dict(
    dim=16, max_steps=4, batch_size=4, seq_len=32, warmup_steps=1, eval_every=2,
    eval_tokens=1024, log_every=1, save_every=0, device="cpu",
)  # fmt: skip


def _rows(path):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(path)]


def test_distill_end_to_end_and_exact_resume_after_ctrl_c(
    micro_prepared, micro_pretrained, tmp_path, monkeypatch
):
    _, run_dir = micro_prepared
    _, model_dir = micro_pretrained
    cfg = DistillConfig(**CFG)
    full = distill.run(cfg, model_dir, run_dir / "data", tmp_path / "full")
    assert not full["interrupted"] and full["step"] == 4
    student = load_model(tmp_path / "full" / "model")
    assert (student.cfg.dim, student.cfg.n_head, student.cfg.head_dim) == (16, 1, 16)
    assert full["student"]["params"] < full["teacher"]["params"]
    assert set(full["student"]["val"]) == set(full["baseline"]["val"]) == {"en", "zh"}
    assert full["headline"].startswith("student (") and "without the teacher" in full["headline"]
    saved = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert saved["teacher"]["val"]["en"]["loss"] == full["teacher"]["val"]["en"]["loss"]
    with torch.no_grad():
        assert student(torch.randint(0, 512, (1, 8))).shape == (1, 8, 512)
    # the baseline is the same student trained on plain cross-entropy: same first batch, so its
    # first loss is the distilled run's first ce (same initial weights, same data)
    kd, base = (read_metrics(tmp_path / "full" / d / "metrics.jsonl") for d in ("", "baseline"))
    assert kd[0]["ce"] == pytest.approx(base[0]["loss"], rel=1e-6)
    assert "kl" in kd[0] and "kl" not in base[0]

    # a real Ctrl-C during the student's step 2: it saves after that step and stops; the same
    # command again finishes with the losses and weights of the uninterrupted run
    calls = {"n": 0}
    real = distill.distill_loss

    def interrupting(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(distill, "distill_loss", interrupting)
    half = distill.run(cfg, model_dir, run_dir / "data", tmp_path / "resumed")
    assert half["interrupted"] and half["step"] == 2
    assert not (tmp_path / "resumed" / "model").exists()
    assert not (tmp_path / "resumed" / "baseline").exists()
    resumed = distill.run(cfg, model_dir, run_dir / "data", tmp_path / "resumed")
    assert not resumed["interrupted"] and resumed["step"] == 4
    for sub in ("", "baseline"):
        assert _rows(tmp_path / "full" / sub / "metrics.jsonl") == _rows(
            tmp_path / "resumed" / sub / "metrics.jsonl"
        )
        a, b = (
            load_file(tmp_path / d / sub / "model" / "model.safetensors")
            for d in ("full", "resumed")
        )
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["student"]["val"] == full["student"]["val"]


def test_bad_teacher_and_data_are_config_errors(micro_prepared, micro_pretrained, tmp_path):
    _, run_dir = micro_prepared
    _, model_dir = micro_pretrained
    cfg = DistillConfig(**CFG)
    with pytest.raises(ConfigError, match="not a model directory"):
        distill.run(cfg, tmp_path, run_dir / "data", tmp_path / "out")
    with pytest.raises(ConfigError, match="head width"):
        distill.run(
            DistillConfig(**{**CFG, "dim": 24}), model_dir, run_dir / "data", tmp_path / "out"
        )
    with pytest.raises(ConfigError, match="exceeds the model's context"):
        distill.run(
            DistillConfig(**{**CFG, "seq_len": 128}), model_dir, run_dir / "data", tmp_path / "o"
        )
