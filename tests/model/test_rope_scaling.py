"""rope_scaling of today's checkpoints (linear, dynamic, yarn, llama3) and Qwen2.5 / Llama 3.2
shaped config.json files: transformers saves a tiny random model, we load it through our real
converter and must produce its logits on a sequence longer than the original context, decode the
same through the KV cache, and save the scaling back for transformers to open again."""

import json

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from lmforge.config import ConfigError, ModelConfig
from lmforge.infer.cpu_decode import CpuDecoder
from lmforge.model.checkpoint import load_model, save_model
from lmforge.model.hf import from_hf_config

TOL = 1e-4  # fp32, max abs difference over all logits
T = 80  # tokens per test sequence: longer than every ORIGINAL below

# made-up tiny shapes; the rope values are the ones real checkpoints use, scaled down in length
BASE = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
)
ORIGINAL = 32  # original_max_position_embeddings: the context before scaling

t = transformers
KINDS = {  # name: config class, model class, config values
    "llama-linear": (
        t.LlamaConfig,
        t.LlamaForCausalLM,
        BASE | dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    ),
    "llama-dynamic": (  # transformers changes nothing within max_position_embeddings
        t.LlamaConfig,
        t.LlamaForCausalLM,
        BASE | dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    ),
    "llama-llama3": (
        t.LlamaConfig,
        t.LlamaForCausalLM,
        BASE
        | dict(
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": ORIGINAL,
            },
        ),
    ),
    "qwen2-yarn": (  # the form Qwen2.5's model cards give ("type", not "rope_type")
        t.Qwen2Config,
        t.Qwen2ForCausalLM,
        BASE
        | dict(
            rope_theta=1000000.0,
            rope_scaling={
                "type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": ORIGINAL,
            },
        ),
    ),
    "mistral-yarn-betas-mscale": (
        t.MistralConfig,
        t.MistralForCausalLM,
        BASE
        | dict(
            sliding_window=None,
            rope_scaling={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": ORIGINAL,
                "beta_fast": 16.0,
                "beta_slow": 2.0,
                "mscale": 0.707,
                "mscale_all_dim": 1.0,
            },
        ),
    ),
}


def _randomize(model):
    with torch.no_grad():  # transformers starts biases at 0 and norms at 1: make them matter
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _logits(model, x):
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out)


@pytest.mark.parametrize("name", KINDS)
def test_rope_scaling_matches_transformers_and_round_trips(tmp_path, name):
    config_cls, model_cls, values = KINDS[name]
    torch.manual_seed(0)
    theirs = _randomize(model_cls(config_cls(**values)))
    theirs.save_pretrained(tmp_path / "hf")
    x = torch.randint(0, 128, (2, T))
    ref = _logits(theirs, x)
    ours = load_model(tmp_path / "hf")
    assert ours.cfg.rope_scaling["factor"] == values["rope_scaling"]["factor"]
    assert (_logits(ours, x) - ref).abs().max().item() <= TOL

    if "dynamic" not in name:  # the scaling matters: without it the logits differ
        plain = json.loads((tmp_path / "hf" / "config.json").read_text())
        plain.pop("rope_parameters")
        plain["rope_theta"] = values.get("rope_theta", 10000.0)
        (tmp_path / "hf" / "config.json").write_text(json.dumps(plain))
        assert (_logits(load_model(tmp_path / "hf"), x) - ref).abs().max().item() > 10 * TOL

    # saved back: the same rope_scaling in config.json, and transformers agrees again
    save_model(ours, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert {k: v for k, v in saved["rope_scaling"].items()} == ours.cfg.rope_scaling
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert (_logits(back, x) - ref).abs().max().item() <= TOL


def test_kv_cache_and_cpu_decoder_use_the_scaled_tables(tmp_path):
    """Decoding reads the same (yarn-scaled, attention-factor-multiplied) tables as the full
    forward: a prefill, then one token at a time past the original context."""
    config_cls, model_cls, values = KINDS["qwen2-yarn"]
    torch.manual_seed(0)
    theirs = _randomize(model_cls(config_cls(**values)))
    theirs.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    ids = torch.randint(0, 128, (T,))
    ref = _logits(theirs, ids.view(1, -1))[0]
    with torch.no_grad():
        cache = ours.new_cache(1)
        parts = [ours(ids[:10].view(1, -1), cache, 0)[0]]
        parts += [ours(ids[p].view(1, 1), cache, p)[0] for p in range(10, T)]
        assert (torch.cat(parts) - ref).abs().max().item() <= TOL
        decoder = CpuDecoder(ours)
        cache = ours.new_cache(1)
        got = [decoder.prefill(ids[:10], cache)]
        got += [decoder.step(ids[p : p + 1], cache, p) for p in range(10, T)]
    assert (torch.stack(got) - ref[9:]).abs().max().item() <= TOL


# made-up tiny config.json files in the shape of the real ones (same keys and rope values; widths,
# depth and vocabulary shrunk), written by hand as a download would bring them
QWEN25_05B_INSTRUCT = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 96,
    "max_position_embeddings": 32768,
    "max_window_layers": 21,
    "model_type": "qwen2",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 128,
}
QWEN25_YARN = QWEN25_05B_INSTRUCT | {
    "max_position_embeddings": 256,
    "sliding_window": 256,
    "tie_word_embeddings": False,
    "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 64, "type": "yarn"},
}
LLAMA32_1B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": [2, 3],
    "head_dim": 16,
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 96,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0",
    "use_cache": True,
    "vocab_size": 128,
}


@pytest.mark.parametrize(
    "hf",
    [QWEN25_05B_INSTRUCT, QWEN25_YARN, LLAMA32_1B],
    ids=["qwen2.5", "qwen2.5-yarn", "llama3.2"],
)
def test_todays_config_json_loads_with_transformers_logits(tmp_path, hf):
    (tmp_path / "config.json").write_text(json.dumps(hf))
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    torch.manual_seed(0)
    theirs = _randomize(AutoModelForCausalLM.from_config(config, dtype=torch.float32))
    theirs.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "config.json").write_text(json.dumps(hf))  # the file as written by hand
    x = torch.randint(0, 128, (2, T))
    ours = load_model(tmp_path / "model")
    assert ours.cfg.tie_embeddings == hf["tie_word_embeddings"]
    assert ours.cfg.rope_scaling == hf.get("rope_scaling", {})
    assert (_logits(ours, x) - _logits(theirs, x)).abs().max().item() <= TOL


# --------------------------------------------------------------------------- refused


def _hf(**kw):
    return {"model_type": "llama"} | BASE | kw


@pytest.mark.parametrize("kind", ["longrope", "mrope", "proportional"])
def test_unsupported_rope_kind_is_refused_by_name(kind):
    for key in ("rope_scaling", "rope_parameters"):
        with pytest.raises(ConfigError, match=f"rope_type '{kind}' is not supported"):
            from_hf_config(_hf(**{key: {"rope_type": kind, "factor": 2.0}}))


def test_partial_rotary_factor_is_refused():
    with pytest.raises(ConfigError, match="partial_rotary_factor=0.5"):
        from_hf_config(_hf(partial_rotary_factor=0.5))
    rope = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}
    with pytest.raises(ConfigError, match="partial_rotary_factor=0.5"):
        from_hf_config(_hf(rope_parameters=rope))


def test_bad_rope_scaling_values_name_the_field():
    llama3 = LLAMA32_1B["rope_scaling"]
    with pytest.raises(ConfigError, match=r"rope_scaling \(llama3\) is missing low_freq_factor"):
        from_hf_config(
            _hf(rope_scaling={k: v for k, v in llama3.items() if k != "low_freq_factor"})
        )
    with pytest.raises(ConfigError, match="factor must be a positive number, got 'big'"):
        ModelConfig(rope_scaling={"rope_type": "linear", "factor": "big"})
    with pytest.raises(ConfigError, match="low_freq_factor must be lower|high_freq_factor must"):
        ModelConfig(rope_scaling=llama3 | {"high_freq_factor": 1.0})
    with pytest.raises(ConfigError, match="short_factor not supported"):
        ModelConfig(rope_scaling={"rope_type": "yarn", "factor": 2.0, "short_factor": [1.0]})
    assert ModelConfig(rope_scaling={"rope_type": "default"}).rope_scaling  # kept, means none
    assert from_hf_config(_hf(rope_scaling={"rope_type": "default"})).rope_scaling == {}
    # a rope_theta inside the dict wins, as in transformers, and is held apart
    cfg = from_hf_config(_hf(rope_theta=1e4, rope_scaling=llama3 | {"rope_theta": 5e5}))
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling == llama3


def test_gguf_export_refuses_a_scaled_model_rather_than_drop_the_scaling(tmp_path):
    pytest.importorskip("gguf")
    from lmforge.compress.gguf import export_gguf

    config_cls, model_cls, values = KINDS["llama-llama3"]
    model_cls(config_cls(**values)).save_pretrained(tmp_path / "hf")
    with pytest.raises(ConfigError, match="GGUF export does not write rope_scaling"):
        export_gguf(tmp_path / "hf", tmp_path / "m.gguf")


def test_quantized_scaled_model_reloads_with_its_scaled_tables(tmp_path):
    """A quantized checkpoint rebuilds its rotary tables on load: with the scaling."""
    from lmforge.compress.quantize import quantize_model
    from lmforge.config import QuantizeConfig
    from lmforge.model.checkpoint import save_quantized
    from lmforge.model.transformer import GPT

    torch.manual_seed(0)
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}
    cfg = ModelConfig(
        vocab_size=96, dim=64, n_layer=2, n_head=4, max_seq_len=128, rope_scaling=yarn
    )
    model = GPT(cfg).eval()
    spec = quantize_model(model, QuantizeConfig(method="int8"), torch.randint(0, 96, (2, 16)))
    save_quantized(model, spec, tmp_path / "q")
    ids = torch.randint(0, 96, (1, T))
    assert torch.equal(_logits(load_model(tmp_path / "q"), ids), _logits(model, ids))
