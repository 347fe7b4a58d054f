"""Learning-rate schedules and weight-decay groups."""

import pytest
import torch

from lmforge.config import ModelConfig, PretrainConfig
from lmforge.model.transformer import GPT
from lmforge.train.optim import lr_at, param_groups


def test_cosine_schedule():
    cfg = PretrainConfig(
        max_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1, schedule="cosine"
    )
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(
        0.55
    )  # halfway through the cosine: mean of peak and floor
    assert lr_at(100, cfg) == pytest.approx(0.1)


def test_wsd_schedule():
    cfg = PretrainConfig(
        max_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.0, schedule="wsd", decay_frac=0.2
    )
    assert lr_at(50, cfg) == 1.0 and lr_at(79, cfg) == 1.0
    assert lr_at(90, cfg) == pytest.approx(0.5)
    assert lr_at(100, cfg) == pytest.approx(0.0)


def test_decay_only_on_matrices():
    model = GPT(ModelConfig(vocab_size=300, dim=32, n_layer=2, n_head=2, max_seq_len=16))
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() == 2 for p in decay["params"])
    assert any(p is model.tok_emb.weight for p in no_decay["params"])
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())  # tied weights counted once
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert torch.optim.AdamW([decay, no_decay])  # the groups are valid optimizer input
