"""Our model against transformers' LlamaForCausalLM on the same random weights, and the KV cache
against a full forward pass."""

import json

import pytest
import torch
import transformers

from lmforge.config import ModelConfig
from lmforge.model.checkpoint import load_model, save_model
from lmforge.model.transformer import GPT, flops_per_token, num_params

TOL = 1e-4  # fp32, max abs difference over all logits (the bound)


def tiny(**kw):
    base = dict(
        vocab_size=320, dim=64, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=64, rope_theta=500.0
    )
    return ModelConfig(**(base | kw))


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_logits_match_transformers(tmp_path, tie, n_kv_head):
    torch.manual_seed(0)
    ours = GPT(tiny(tie_embeddings=tie, n_kv_head=n_kv_head)).eval()
    save_model(ours, tmp_path)
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 320, (3, 40))
    with torch.no_grad():
        diff = (ours(x) - theirs(x).logits).abs().max().item()
    assert diff <= TOL, diff


def test_transformers_checkpoint_loads_into_ours(tmp_path):
    torch.manual_seed(1)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    theirs = transformers.LlamaForCausalLM(hf_cfg).eval()
    theirs.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    x = torch.randint(0, 300, (2, 33))
    with torch.no_grad():
        assert (ours(x) - theirs(x).logits).abs().max().item() <= TOL
    assert ours.cfg.ffn_dim == 160 and ours.cfg.n_kv_head == 2


def test_kv_cache_decoding_equals_full_forward():
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    x = torch.randint(0, 320, (2, 30))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2)
        parts = [model(x[:, :7], cache, 0), model(x[:, 7:12], cache, 7)]  # prefill, then a chunk
        parts += [model(x[:, t : t + 1], cache, t) for t in range(12, 30)]  # one token at a time
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-5)


def test_last_only_and_context_limit():
    model = GPT(tiny()).eval()
    x = torch.randint(0, 320, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(x, last_only=True), model(x)[:, -1:])
    with pytest.raises(AssertionError, match="exceeds the model's context of 64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_param_count_and_flops():
    cfg = tiny(tie_embeddings=False)
    model = GPT(cfg)
    per_layer = 64 * (4 + 2 * 2) * 16 + 64 * 64 + 3 * 64 * cfg.ffn_dim + 2 * 64
    expected = 2 * 320 * 64 + 2 * per_layer + 64
    assert num_params(model) == expected
    assert num_params(GPT(tiny(tie_embeddings=True))) == expected - 320 * 64
    # forward matmul FLOPs = 2 x (weights touched per token) + attention scores
    n_matmul = num_params(model) - 320 * 64 - 64 - 2 * 2 * 64
    assert flops_per_token(cfg, 32, training=False) == 2 * n_matmul + 2 * 2 * 2 * 64 * 32
    assert flops_per_token(cfg, 32) == 3 * flops_per_token(cfg, 32, training=False)


# made up for the tests: the absurd config.json values of the issue, each with the field the
# error must name
BAD_CONFIG_JSON = [
    ({"vocab_size": -1}, "vocab_size"),
    ({"hidden_size": "64"}, "hidden_size"),
    ({"num_hidden_layers": 1_000_000}, "num_hidden_layers"),
    ({"num_hidden_layers": 1e6}, "num_hidden_layers"),
    ({"num_attention_heads": True}, "num_attention_heads"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
    ({"num_attention_heads": 5}, "num_attention_heads"),  # 64 is not divisible by 5
    ({"max_position_embeddings": 10**12}, "max_seq_len"),  # rotary tables of terabytes
    ({"intermediate_size": 10**12}, "ffn_dim"),  # parameters of petabytes
]


@pytest.mark.parametrize("change, field", BAD_CONFIG_JSON)
def test_absurd_config_json_is_a_clear_error(tmp_path, change, field):
    from lmforge.config import ConfigError

    save_model(GPT(tiny()), tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | change))
    with pytest.raises(ConfigError, match=field):
        load_model(tmp_path)


def test_config_json_that_is_not_an_object_names_the_file(tmp_path):
    from lmforge.config import ConfigError

    save_model(GPT(tiny()), tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'config.json'} must hold a JSON object"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"tie_embeddings": False, "qkv_bias": True, "arch": "qwen2"},
        {"arch": "gpt2", "norm": "layernorm", "mlp": "gelu", "pos": "learned", "n_kv_head": 4}
        | {"qkv_bias": True, "bias": True},
    ],
)
def test_memory_estimate_counts_every_parameter_and_the_rotary_tables(kw):
    from lmforge.config import model_memory

    cfg = tiny(**kw)
    model = GPT(cfg)
    est = model_memory(cfg)
    assert est["parameters"] == 4 * num_params(model)
    buffers = sum(b.numel() for b in model.buffers())
    assert est["rotary tables"] == 4 * buffers


def test_a_model_over_the_memory_limit_is_refused_before_allocating():
    from lmforge.config import ConfigError, check_model_fits

    cfg = tiny(max_seq_len=4096)  # 2 x 4096 x 16 floats of rotary tables: 0.5 MiB
    with pytest.raises(ConfigError, match=r"about 0\.0 GB .*check model\.max_seq_len \(4096\)"):
        check_model_fits(cfg, limit=100_000)
    check_model_fits(cfg, limit=10**9)
    with pytest.raises(ConfigError, match=r"model\.max_seq_len \(1000000000000\)"):
        GPT(tiny(max_seq_len=10**12))  # would be 128 TB: refused at once, nothing allocated
