"""Checkpoint directories: round trip, atomic writes, and clear errors for damaged files."""

import errno
import json

import pytest
import torch

import lmforge.model.checkpoint as ckpt_mod
from lmforge.config import ConfigError, ModelConfig
from lmforge.io import atomic_dir
from lmforge.model.checkpoint import load_model, save_model
from lmforge.model.transformer import GPT


def _model(seed=0):
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=300, dim=32, n_layer=1, n_head=2, max_seq_len=32))


def _save(model, path):
    with atomic_dir(path) as tmp:
        save_model(model, tmp)


def test_round_trip_is_exact(tmp_path):
    m = _model()
    _save(m, tmp_path / "ck")
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["hidden_size"] == 32
    m2 = load_model(tmp_path / "ck")
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    _save(_model(), tmp_path / "ck")
    f = tmp_path / "ck" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ConfigError, match="model.safetensors is corrupt or truncated"):
        load_model(tmp_path / "ck")


def test_garbage_safetensors_is_a_clear_error(tmp_path):
    _save(_model(), tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ConfigError, match="corrupt or truncated"):
        load_model(tmp_path / "ck")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint directory not found"):
        load_model(tmp_path / "nope")
    _save(_model(), tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="model.safetensors is missing"):
        load_model(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        load_model(tmp_path / "ck")


def test_shape_mismatch_names_the_tensor(tmp_path):
    _save(_model(), tmp_path / "ck")
    cfg_path = tmp_path / "ck" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["intermediate_size"] = 192
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="mlp.w13.weight has shape"):
        load_model(tmp_path / "ck")


def test_full_disk_leaves_no_partial_checkpoint_and_keeps_the_old_one(tmp_path, monkeypatch):
    good = _model(0)
    _save(good, tmp_path / "ck")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _save(_model(1), tmp_path / "ck")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary left behind
    reloaded = load_model(tmp_path / "ck")  # the previous checkpoint is intact
    assert torch.equal(reloaded.tok_emb.weight, good.tok_emb.weight)


def _chain_model(vocab_size: int, chain: list[int]) -> GPT:
    """A rigged (made-up) model whose greedy next token depends only on the current one:
    chain[i] -> chain[i + 1], the last back to chain[1]. Attention and MLP write nothing, so
    the residual stream is the token's embedding, a one-hot of its place in the chain, and
    lm_head maps that place to the next token with logit 80 (every other logit is 0)."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=vocab_size, dim=32, n_layer=1, n_head=2, max_seq_len=32, tie_embeddings=False
    )
    model = GPT(cfg).eval()
    sd = model.state_dict()
    for k in sd:
        if k.endswith(("wo.weight", "w2.weight", "tok_emb.weight", "lm_head.weight")):
            sd[k].zero_()
    nxt = chain[1:] + [chain[1]]
    for slot, (t, n) in enumerate(zip(chain, nxt)):
        sd["tok_emb.weight"][t, slot] = 1.0
        sd["lm_head.weight"][n, slot] = 10.0
    model.load_state_dict(sd)
    return model


def test_generation_config_lists_every_stop_id_and_transformers_stops_at_im_end(tmp_path):
    """HF generate reads eos_token_id from generation_config.json: a chat model ends its turn
    with <|im_end|>, so that must be listed beside EOS, or transformers and vLLM run past it."""
    transformers = pytest.importorskip("transformers")
    from lmforge.infer.generate import generate
    from lmforge.tokenizer import Tokenizer
    from lmforge.tokenizer_train import train_tokenizer

    text = ["a made-up corpus: the cat sat on the mat, 猫坐在垫子上。"] * 20
    train_tokenizer(text, vocab_size=300).save(tmp_path / "tok")
    tok = Tokenizer.load(tmp_path / "tok")
    im_end = tok.token_id("<|im_end|>")
    chain = [tok.bos_id, *tok.encode(" cat mat")[:2], im_end]
    model = _chain_model(tok.vocab_size, chain)
    with atomic_dir(tmp_path / "ck") as tmp:
        save_model(model, tmp, tokenizer_dir=tmp_path / "tok", pad_token_id=tok.pad_id)
    gen_cfg = json.loads((tmp_path / "ck" / "generation_config.json").read_text())
    assert gen_cfg["eos_token_id"] == [tok.eos_id, im_end] == list(tok.stop_ids())

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck").eval()
    assert im_end in transformers.GenerationConfig.from_pretrained(tmp_path / "ck").eos_token_id
    out = hf.generate(torch.tensor([[tok.bos_id]]), max_new_tokens=12, do_sample=False)
    assert out[0].tolist() == chain  # stopped at <|im_end|>, not 12 tokens later
    ours = list(generate(model, [tok.bos_id], max_new_tokens=12, stop_ids=tok.stop_ids()))
    assert [tok.bos_id, *ours] == chain  # lmforge stops at the same token
    # without a tokenizer there is nothing but EOS to list
    with atomic_dir(tmp_path / "bare") as tmp:
        save_model(model, tmp)
    assert (
        json.loads((tmp_path / "bare" / "generation_config.json").read_text())["eos_token_id"]
        == tok.eos_id
    )
