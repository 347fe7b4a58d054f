"""Checkpoints of the Llama, Qwen2, Mistral and GPT-2 families: transformers saves a tiny random
model, we load it and must produce its logits (also through the KV cache), then save it back in
the same family's format for AutoModelForCausalLM to open with the same logits again."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from lmforge.config import ConfigError, ModelConfig
from lmforge.model.checkpoint import load_model, save_model
from lmforge.model.hf import from_hf_config
from lmforge.model.transformer import GPT

TOL = 1e-4  # fp32, max abs difference over all logits

ROPE = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=96,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
)
GPT2 = dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)
GPT2 |= dict(bos_token_id=0, eos_token_id=0)

t = transformers
CASES = {  # name: config class, model class, config values
    "llama-untied-gqa-head_dim": (
        t.LlamaConfig,
        t.LlamaForCausalLM,
        ROPE | dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=False),
    ),
    "qwen2-tied-gqa": (
        t.Qwen2Config,
        t.Qwen2ForCausalLM,
        ROPE | dict(num_key_value_heads=2, tie_word_embeddings=True),
    ),
    "qwen2-untied-mha-head_dim": (
        t.Qwen2Config,
        t.Qwen2ForCausalLM,
        ROPE | dict(num_key_value_heads=4, head_dim=24, tie_word_embeddings=False),
    ),
    "mistral-untied-head_dim": (
        t.MistralConfig,
        t.MistralForCausalLM,
        ROPE | dict(num_key_value_heads=2, head_dim=32, sliding_window=None),
    ),
    "mistral-tied-window-covers-context": (
        t.MistralConfig,
        t.MistralForCausalLM,
        ROPE | dict(num_key_value_heads=1, sliding_window=64, tie_word_embeddings=True),
    ),
    "mistral-sliding-window-8": (
        t.MistralConfig,
        t.MistralForCausalLM,
        ROPE | dict(num_key_value_heads=2, sliding_window=8),
    ),
    "gpt2-tied": (t.GPT2Config, t.GPT2LMHeadModel, GPT2),
    "gpt2-untied-n_inner": (
        t.GPT2Config,
        t.GPT2LMHeadModel,
        GPT2 | dict(tie_word_embeddings=False, n_inner=96),
    ),
}


def _hf_model(name, seed=0):
    config_cls, model_cls, values = CASES[name]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**values)).eval()
    with torch.no_grad():  # transformers starts biases at 0 and norms at 1: make them matter
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _max_diff(model, x, ref):
    with torch.no_grad():
        out = model(x)
    return (getattr(out, "logits", out) - ref).abs().max().item()


@pytest.mark.parametrize("name", CASES)
def test_family_matches_transformers_and_round_trips(tmp_path, name):
    theirs = _hf_model(name)
    theirs.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    family = theirs.config.model_type
    assert ours.cfg.arch == family
    x = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        ref = theirs(x).logits
    assert _max_diff(ours, x, ref) <= TOL

    # KV cache: a prefill, a chunk after history, then one token at a time = the full forward
    with torch.no_grad():
        cache = ours.new_cache(2)
        parts = [ours(x[:, :7], cache, 0), ours(x[:, 7:12], cache, 7)]
        parts += [ours(x[:, p : p + 1], cache, p) for p in range(12, 24)]
    assert (torch.cat(parts, 1) - ref).abs().max().item() <= TOL

    # our save opens in transformers as the same family, with the same logits
    save_model(ours, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["model_type"] == family
    assert saved["architectures"] == [type(theirs).__name__]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(back) is type(theirs)
    assert _max_diff(back, x, ref) <= TOL
    again = load_model(tmp_path / "ours")  # and our own reload is exact
    for (k, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_sliding_window_is_read_and_written(tmp_path):
    theirs = _hf_model("mistral-sliding-window-8")
    theirs.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    assert ours.cfg.sliding_window == 8 and ours.cfg.head_dim == 16
    save_model(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["sliding_window"] == 8


def test_gpt2_without_transformer_prefix_loads(tmp_path):
    """openai-community/gpt2's own weights were saved from GPT2Model: `h.0...`, not
    `transformer.h.0...`."""
    theirs = _hf_model("gpt2-tied")
    theirs.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(str(f)).items()}
    save_file(tensors, str(f), metadata={"format": "pt"})
    x = torch.randint(0, 128, (1, 20))
    with torch.no_grad():
        assert _max_diff(load_model(tmp_path), x, theirs(x).logits) <= TOL


def test_default_llama_layout_is_unchanged():
    """Checkpoints, the trainer and LoRA rely on these names: the new families add none."""
    model = GPT(ModelConfig(vocab_size=64, dim=32, n_layer=1, n_head=2, tie_embeddings=False))
    assert list(model.state_dict()) == [
        "tok_emb.weight",
        "layers.0.attn_norm.weight",
        "layers.0.attn.wqkv.weight",
        "layers.0.attn.wo.weight",
        "layers.0.mlp_norm.weight",
        "layers.0.mlp.w13.weight",
        "layers.0.mlp.w2.weight",
        "norm.weight",
        "lm_head.weight",
    ]


# --------------------------------------------------------------------------- bad input


def _llama_dict(**kw):
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"]} | ROPE | kw


def test_unknown_model_type_names_it_and_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]})
    )
    with pytest.raises(
        ConfigError, match="model_type 'bert'.*supported: llama, qwen2, mistral, gpt2"
    ):
        load_model(tmp_path)


def test_family_from_architectures_when_model_type_is_missing():
    hf = _llama_dict(architectures=["Qwen2ForCausalLM"])
    del hf["model_type"]
    assert from_hf_config(hf).arch == "qwen2"


@pytest.mark.parametrize(
    "option", ["scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"]
)
def test_gpt2_non_default_option_is_refused(tmp_path, option):
    theirs = _hf_model("gpt2-tied")
    theirs.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[option] = True
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=f"unsupported gpt2 options.*{option}"):
        load_model(tmp_path)


def test_gpt2_unscaled_attention_and_other_activation_are_refused():
    hf = {"model_type": "gpt2"} | GPT2
    with pytest.raises(ConfigError, match="scale_attn_weights=False"):
        from_hf_config(hf | {"scale_attn_weights": False})
    with pytest.raises(ConfigError, match="activation_function=relu"):
        from_hf_config(hf | {"activation_function": "relu"})


def test_qwen2_sliding_window_is_refused_only_when_it_binds():
    hf = _llama_dict(model_type="qwen2", use_sliding_window=True, sliding_window=16)
    with pytest.raises(ConfigError, match="use_sliding_window=true with sliding_window=16"):
        from_hf_config(hf | {"max_window_layers": 0})
    assert from_hf_config(hf | {"max_window_layers": 2}).sliding_window == 0  # no layer slides
    assert from_hf_config(hf | {"max_window_layers": 0, "sliding_window": 64}).arch == "qwen2"
    assert from_hf_config(hf | {"use_sliding_window": False, "max_window_layers": 0}).arch


def test_other_rope_kinds_are_refused():
    """linear, dynamic, yarn and llama3 load (tests/model/test_rope_scaling.py); others do not."""
    rope = {"rope_type": "longrope", "factor": 2.0}
    with pytest.raises(ConfigError, match="rope_type 'longrope' is not supported"):
        from_hf_config(_llama_dict(model_type="mistral", rope_scaling=rope))
    with pytest.raises(ConfigError, match="rope_type 'longrope' is not supported"):
        from_hf_config(_llama_dict(model_type="qwen2", rope_parameters=rope))


def test_model_config_names_what_an_arch_needs():
    with pytest.raises(ConfigError, match="'gpt2' computes with norm: layernorm, mlp: gelu"):
        ModelConfig(arch="gpt2")
    with pytest.raises(ConfigError, match="sliding_window needs arch 'mistral'"):
        ModelConfig(sliding_window=16)
    cfg = ModelConfig(arch="qwen2", qkv_bias=True, dim=64, n_head=4, head_dim=24)
    assert cfg.head_dim == 24 and ModelConfig(dim=64, n_head=4).head_dim == 16
