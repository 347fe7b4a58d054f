"""MLM pretraining of the encoder: the 15% / 80-10-10 masking, the loss against transformers'
BertForMaskedLM, and a few steps through the common clock (train/loop.py:fit) lowering it."""

import pytest
import torch

from lmforge.config import PretrainConfig
from lmforge.model.bert import Bert, BertConfig, from_hf_state_dict, to_hf_config
from lmforge.train.loop import fit
from lmforge.train.metrics import read_metrics
from lmforge.train.mlm import IGNORE, mask_tokens, mlm_loss, mlm_train_step

MASK = 3  # made up: a tiny vocabulary where 0 is padding and 3 is [MASK]


def test_masking_is_15_percent_of_real_tokens_80_10_10():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 1000, (64, 512), generator=g)  # made-up tokens
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -100:] = True  # [CLS] and padding
    inputs, labels = mask_tokens(ids, special, MASK, 1000, torch.Generator().manual_seed(1))
    target = labels != IGNORE
    assert not target[special].any()
    assert (labels[target] == ids[target]).all() and (inputs[~target] == ids[~target]).all()
    frac = target.sum() / (~special).sum()
    assert 0.14 < frac < 0.16
    masked = (inputs[target] == MASK).float().mean()
    kept = (inputs[target] == ids[target]).float().mean()
    assert 0.78 < masked < 0.82 and 0.08 < kept < 0.12  # random: the rest, ~10%


def test_loss_equals_transformers():
    transformers = pytest.importorskip("transformers", reason="the reference loss")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, dim=32, n_layer=2, n_head=4, ffn_dim=64, max_seq_len=16)
    theirs = transformers.BertForMaskedLM(transformers.BertConfig(**to_hf_config(cfg, True)))
    ours = Bert(cfg, mlm_head=True)
    ours.load_state_dict(from_hf_state_dict(theirs.eval().state_dict(), cfg))
    ids = torch.randint(4, 50, (3, 16))  # made up
    attn = torch.ones_like(ids)
    inputs, labels = mask_tokens(ids, ~attn.bool(), MASK, 50, torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss_sum, n = mlm_loss(ours.eval(), inputs, labels, attn)
        ref = theirs(input_ids=inputs, attention_mask=attn, labels=labels).loss
    torch.testing.assert_close(loss_sum / n, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # 40 optimizer steps
def test_a_few_steps_through_fit_lower_the_loss(tmp_path):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=24, dim=32, n_layer=2, n_head=4, ffn_dim=64, max_seq_len=16)
    model = Bert(cfg, mlm_head=True).train()
    # made-up data: each row repeats one token, so a masked token is its neighbours' token
    rows = (torch.arange(20) + 4).unsqueeze(1).repeat(1, 16)

    def batches():
        g = torch.Generator().manual_seed(0)
        while True:
            ids = rows[torch.randint(0, 20, (32,), generator=g)]
            yield ids, torch.ones_like(ids), torch.zeros_like(ids, dtype=torch.bool)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    run = PretrainConfig(max_steps=40, lr=1e-2, warmup_steps=5, log_every=10, eval_every=0,
                         save_every=0)  # fmt: skip
    step = mlm_train_step(model, opt, batches(), MASK)
    out = fit(run, opt, step, None, lambda s, state: None, out_dir=tmp_path, desc="mlm")
    losses = [row["loss"] for row in read_metrics(tmp_path / "metrics.jsonl") if "loss" in row]
    assert out["step"] == 40 and len(losses) == 4
    assert losses[-1] < 0.7 * losses[0], losses
