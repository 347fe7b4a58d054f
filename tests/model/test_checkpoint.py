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
