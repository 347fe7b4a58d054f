"""The BERT encoder against transformers' BertModel and BertForMaskedLM, both ways."""

import json

import pytest
import torch

from lmforge.config import ConfigError
from lmforge.model.bert import (
    Bert,
    BertConfig,
    from_hf_config,
    from_hf_state_dict,
    load_bert,
    save_bert,
    to_hf_config,
)

transformers = pytest.importorskip("transformers", reason="HF parity needs transformers")

CONFIGS = [  # random small shapes, made up for the tests
    dict(vocab_size=97, dim=32, n_layer=2, n_head=4, ffn_dim=64, max_seq_len=24),
    dict(
        vocab_size=61,
        dim=48,
        n_layer=3,
        n_head=3,
        ffn_dim=80,
        max_seq_len=16,
        type_vocab_size=3,
        norm_eps=1e-5,
        act="gelu_new",
    ),  # fmt: skip
]


def _batch(cfg: BertConfig, seed: int = 0):
    """Two rows, the second right-padded: ids, attention mask and token types (made up)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, cfg.vocab_size, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    ids[1, 7:] = cfg.pad_token_id
    types = torch.randint(0, cfg.type_vocab_size, (2, 12), generator=g)
    return ids, mask, types


def _hf(cfg: BertConfig, mlm: bool):
    hf_cfg = transformers.BertConfig(**to_hf_config(cfg, mlm_head=mlm))
    cls = transformers.BertForMaskedLM if mlm else transformers.BertModel
    return cls(hf_cfg).eval()


def _valid(x, mask):
    """Only real tokens: padded positions are free to differ (no one reads them)."""
    return x[mask.bool()]


@pytest.mark.parametrize("kw", CONFIGS)
@pytest.mark.parametrize("mlm", [False, True])
def test_we_read_theirs(kw, mlm):
    torch.manual_seed(0)
    cfg = BertConfig(**kw)
    theirs = _hf(cfg, mlm)
    ours = Bert(cfg, mlm_head=mlm).eval()
    ours.load_state_dict(from_hf_state_dict(theirs.state_dict(), cfg))
    ids, mask, types = _batch(cfg)
    with torch.no_grad():
        out = theirs(input_ids=ids, attention_mask=mask, token_type_ids=types,
                     output_hidden_states=True)  # fmt: skip
        hidden = ours(ids, mask, types)
        ref = out.hidden_states[-1] if mlm else out.last_hidden_state
        torch.testing.assert_close(_valid(hidden, mask), _valid(ref, mask), rtol=1e-4, atol=1e-4)
        if mlm:
            logits = ours.mlm_logits(hidden)
            torch.testing.assert_close(
                _valid(logits, mask), _valid(out.logits, mask), rtol=1e-4, atol=1e-4
            )


@pytest.mark.parametrize("kw", CONFIGS)
@pytest.mark.parametrize("mlm", [False, True])
def test_they_read_ours(kw, mlm, tmp_path):
    torch.manual_seed(1)
    cfg = BertConfig(**kw)
    ours = Bert(cfg, mlm_head=mlm).eval()
    with torch.no_grad():  # a nonzero MLM bias and LayerNorm, so a dropped tensor would show
        for name, p in ours.named_parameters():
            if "norm" in name or "bias" in name:
                p.normal_(0.0, 0.1)
    save_bert(ours, tmp_path)
    cls = transformers.BertForMaskedLM if mlm else transformers.BertModel
    theirs = cls.from_pretrained(tmp_path).eval()
    ids, mask, types = _batch(cfg, seed=2)
    with torch.no_grad():
        out = theirs(input_ids=ids, attention_mask=mask, token_type_ids=types,
                     output_hidden_states=True)  # fmt: skip
        hidden = ours(ids, mask, types)
        ref = out.hidden_states[-1] if mlm else out.last_hidden_state
        torch.testing.assert_close(_valid(hidden, mask), _valid(ref, mask), rtol=1e-4, atol=1e-4)
        if mlm:
            torch.testing.assert_close(
                _valid(ours.mlm_logits(hidden), mask), _valid(out.logits, mask),
                rtol=1e-4, atol=1e-4,
            )  # fmt: skip
    back = load_bert(tmp_path)  # and our own loader reads what we wrote, tensor for tensor
    for name, t in ours.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], t, rtol=0, atol=0)


def test_padding_does_not_change_real_tokens():
    """A row alone equals the same row padded in a batch (the padding mask works)."""
    torch.manual_seed(0)
    cfg = BertConfig(**CONFIGS[0])
    model = Bert(cfg).eval()
    ids, mask, types = _batch(cfg)
    with torch.no_grad():
        batched = model(ids, mask, types)[1, :7]
        alone = model(ids[1:, :7], mask[1:, :7], types[1:, :7])[0]
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


def test_refuses_what_it_does_not_compute(tmp_path):
    hf = to_hf_config(BertConfig(**CONFIGS[0]))
    with pytest.raises(ConfigError, match="position_embedding_type"):
        from_hf_config({**hf, "position_embedding_type": "relative_key"})
    with pytest.raises(ConfigError, match="hidden_act"):
        from_hf_config({**hf, "hidden_act": "relu"})
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match="model.safetensors is missing"):
        load_bert(tmp_path)
