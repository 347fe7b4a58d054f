"""T5 (model/t5.py): transformers' T5ForConditionalGeneration gives the same logits and greedy
tokens, both ways; the cached decoder matches full recomputation. Models are random and tiny."""

import pytest
import torch

from lmforge.model.t5 import (
    T5,
    T5Config,
    from_hf_config,
    from_hf_state_dict,
    load_t5,
    relative_bucket,
    save_t5,
)

transformers = pytest.importorskip("transformers")

TINY = dict(
    vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
    relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
)  # fmt: skip
STYLES = {
    "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "original": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "gated-relu": dict(feed_forward_proj="gated-relu", tie_word_embeddings=True),
}


def hf_model(style: str, seed: int = 0, wide: bool = False, **over):
    """A random transformers T5. Its init (embeddings of std 1 against sublayers of std
    ~dim^-0.5) makes an untrained model echo its input token, so for decoding (wide) the
    layers are redrawn wider: greedy decoding then writes varied tokens."""
    torch.manual_seed(seed)
    cfg = transformers.T5Config(**(TINY | over), **STYLES[style])
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters() if wide else []:
            if p.dim() == 2 and "shared" not in name and "lm_head" not in name:
                p.normal_(std=0.5)
    return model


def our_config(style: str, **over) -> T5Config:
    # transformers 5 rewrites tie_word_embeddings to True in its config (keeping only whether
    # to scale), so the config.json a v1.1 checkpoint ships is what we read here
    return from_hf_config({"model_type": "t5"} | TINY | over | STYLES[style])


def ours_from(hf, style: str, **over) -> T5:
    cfg = our_config(style, **over)
    model = T5(cfg)
    model.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg))
    return model.eval()


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)  # made-up token ids for a test
    idx = torch.randint(2, 64, (2, 20), generator=g)
    dec = torch.randint(2, 64, (2, 11), generator=g)
    mask = torch.ones_like(idx)
    mask[1, 15:] = 0  # the second row is padded
    return idx, dec, mask


@pytest.mark.parametrize("style", list(STYLES))
def test_logits_match_transformers(style):
    hf = hf_model(style)
    ours = ours_from(hf, style)
    idx, dec, mask = inputs()
    with torch.no_grad():
        want = hf(input_ids=idx, attention_mask=mask, decoder_input_ids=dec).logits
        got = ours(idx, dec, attention_mask=mask)
    assert (got - want).abs().max() < 1e-4


@pytest.mark.parametrize("style", list(STYLES))
def test_saved_model_opens_in_transformers(style, tmp_path):
    torch.manual_seed(3)
    ours = T5(our_config(style)).eval()
    save_t5(ours, tmp_path)
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    idx, dec, mask = inputs()
    with torch.no_grad():
        want = hf(input_ids=idx, attention_mask=mask, decoder_input_ids=dec).logits
        got = ours(idx, dec, attention_mask=mask)
    assert (got - want).abs().max() < 1e-4
    again = load_t5(tmp_path)
    assert torch.equal(again(idx, dec, attention_mask=mask), got)


def test_load_opens_a_t5_directory(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    from lmforge.config import ConfigError
    from lmforge.model.load import load

    torch.manual_seed(4)
    ours = T5(
        T5Config(vocab_size=64, dim=16, d_kv=4, ffn_dim=24, n_layer=1, n_decoder_layer=1, n_head=4)
    )
    save_t5(ours, tmp_path)
    vocab = {"<pad>": 0, "</s>": 1} | {f"w{i}": i for i in range(2, 64)}  # a made-up vocabulary
    tok = HFTokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        '{"bos_token": null, "eos_token": "</s>", "pad_token": "<pad>"}'  # T5 has no BOS
    )
    model, tokenizer = load(tmp_path)
    with pytest.raises(ConfigError, match="is a T5 .encoder-decoder.: this stage works on GPT"):
        load(tmp_path, trainable=True)  # a stage that trains a GPT
    assert isinstance(model, T5) and tokenizer.vocab_size == 64
    idx = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(model(idx, idx[:, :2]), ours.eval()(idx, idx[:, :2]), atol=1e-6)


@pytest.mark.parametrize("style", list(STYLES))
def test_cached_greedy_matches_recompute_and_transformers(style):
    same = dict(num_decoder_layers=TINY["num_layers"])  # transformers 5.24's generate sizes
    # its decoder cache by num_layers (IndexError with a deeper decoder)
    hf = hf_model(style, seed=8, wide=True, **same)  # seed 8: v1.1 row 0 ends with EOS
    ours = ours_from(hf, style, **same)
    idx, _, mask = inputs(seed=6)
    cached = ours.generate_greedy(idx, 12, attention_mask=mask)
    full = ours.generate_greedy(idx, 12, attention_mask=mask, use_cache=False)
    assert torch.equal(cached, full)
    assert len(cached.unique()) >= 3  # not a degenerate repeat of one token
    want = hf.generate(
        input_ids=idx, attention_mask=mask, max_new_tokens=12, do_sample=False, num_beams=1
    )
    assert torch.equal(cached, want[:, 1:])  # transformers' rows begin with the start token


def test_relative_buckets():
    rel = torch.arange(-40, 41)
    enc = relative_bucket(rel, True, 32, 128)
    dec = relative_bucket(rel, False, 32, 128)
    assert enc[40] == 0 and enc[41] == 17 and enc[39] == 1  # 0, +1 (after), -1 (before)
    assert (dec[41:] == 0).all() and dec[39] == 1  # causal: keys after the query all share 0
    assert enc.max() < 32 and dec.max() < 32


def test_cache_with_a_deeper_decoder_matches_recompute():
    hf = hf_model("v1.1", seed=7, wide=True)  # 2 encoder, 3 decoder layers
    ours = ours_from(hf, "v1.1")
    idx, _, mask = inputs(seed=6)
    cached = ours.generate_greedy(idx, 12, attention_mask=mask)
    assert torch.equal(cached, ours.generate_greedy(idx, 12, mask, use_cache=False))
    assert len(cached.unique()) >= 3


def test_bad_configs_and_checkpoints_are_named(tmp_path):
    from lmforge.config import ConfigError

    with pytest.raises(ConfigError, match="feed_forward_proj 'gated-silu'"):
        from_hf_config({"model_type": "t5", "feed_forward_proj": "gated-silu"})
    with pytest.raises(ConfigError, match="is not 't5'"):
        from_hf_config({"model_type": "bert"})
    with pytest.raises(ConfigError, match="config.json is missing"):
        load_t5(tmp_path)
    cfg = our_config("v1.1")
    # an untied checkpoint without its lm_head
    sd = {k: v for k, v in hf_model("v1.1").state_dict().items() if k != "lm_head.weight"}
    with pytest.raises(ConfigError, match="no tensor lm_head.weight"):
        from_hf_state_dict(sd, cfg)

    save_t5(T5(our_config("v1.1")), tmp_path)
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(cfg_file.read_text().replace('"d_ff": 48', '"d_ff": 40'))
    with pytest.raises(ConfigError, match="does not fit config.json: size mismatch"):
        load_t5(tmp_path)
