"""Hugging Face interop: our ModelConfig <-> the config.json of six families (Llama, Qwen2,
Mistral, Mixtral, Qwen2-MoE, GPT-2), our tensors <-> their tensor names.

The one idea: names and shapes are all that differ. HF stores q/k/v (and SwiGLU's gate/up) as
separate matrices; we keep them fused, so export splits along the output dimension and import
concatenates. GPT-2 already fuses q/k/v (`c_attn`) but in a `Conv1D`, whose weight is (in, out):
those are transposed. RoPE needs no permutation because our rotation uses HF's rotate_half pairing. The experts of
Mixtral and Qwen2-MoE are written one matrix each (`block_sparse_moe.experts.{i}.w1/w2/w3`,
`mlp.experts.{i}.gate_proj/...`: the original checkpoints' names, which transformers 5 also
writes) and read in that layout or transformers 5's in-memory one (`mlp.experts.gate_up_proj`,
stacked like ours).

`rope_scaling` (or transformers 5's `rope_parameters`) of the linear, dynamic, yarn and llama3
kinds is kept in ModelConfig.rope_scaling and written back as it was read. Options that change the
math and that we do not compute (other rope kinds, partial rotary embeddings, a binding Qwen2
sliding window, GPT-2's attention variants) are refused with the field named. Dropout rates are
ignored on import (they do not change inference) and written as 0.0 on export: lmforge trains
without dropout.
"""

from __future__ import annotations

import re

import torch

from lmforge.config import ARCH_FEATURES, ConfigError, ModelConfig
from lmforge.model.transformer import rope_kind

# model_type -> the `architectures` entry transformers' AutoModelForCausalLM opens
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
}

# our ModelConfig field -> LlamaConfig field (Qwen2Config and MistralConfig use the same names)
CONFIG_FIELDS = {
    "vocab_size": "vocab_size",
    "dim": "hidden_size",
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "n_kv_head": "num_key_value_heads",
    "ffn_dim": "intermediate_size",
    "max_seq_len": "max_position_embeddings",
    "rope_theta": "rope_theta",
    "norm_eps": "rms_norm_eps",
    "tie_embeddings": "tie_word_embeddings",
    "init_std": "initializer_range",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
}

# MixtralConfig: LlamaConfig's names, the experts', and two of ours that transformers does not
# compute (it keeps unknown keys): a capacity that drops tokens changes what the model computes,
# so a round trip must keep it
MIXTRAL_FIELDS = CONFIG_FIELDS | {
    "n_experts": "num_local_experts",
    "experts_per_token": "num_experts_per_tok",
    "moe_aux_coef": "router_aux_loss_coef",
    "moe_z_coef": "router_z_loss_coef",
    "capacity_factor": "capacity_factor",
}
# Qwen2MoeConfig: its experts' width is moe_intermediate_size (intermediate_size is the width of
# dense layers, which a model with every layer sparse has none of), a shared expert beside them
QWEN2_MOE_FIELDS = MIXTRAL_FIELDS | {
    "ffn_dim": "moe_intermediate_size",
    "n_experts": "num_experts",
    "norm_topk": "norm_topk_prob",
    "shared_expert_dim": "shared_expert_intermediate_size",
}

# our ModelConfig field -> GPT2Config field
GPT2_FIELDS = {
    "vocab_size": "vocab_size",
    "dim": "n_embd",
    "n_layer": "n_layer",
    "n_head": "n_head",
    "ffn_dim": "n_inner",  # null = 4 * n_embd, as our ffn_dim = 0
    "max_seq_len": "n_positions",
    "norm_eps": "layer_norm_epsilon",
    "tie_embeddings": "tie_word_embeddings",
    "init_std": "initializer_range",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
}

# transformers' class defaults for keys an older config.json may leave out
HF_DEFAULTS = {
    "llama": {"tie_word_embeddings": False, "rms_norm_eps": 1e-6},
    "qwen2": {"tie_word_embeddings": False, "rms_norm_eps": 1e-6},
    "mistral": {"tie_word_embeddings": False, "rms_norm_eps": 1e-6},
    "mixtral": {
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "router_aux_loss_coef": 0.001,
    },
    "qwen2_moe": {
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-6,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "norm_topk_prob": False,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "router_aux_loss_coef": 0.001,
    },
    "gpt2": {"tie_word_embeddings": True, "layer_norm_epsilon": 1e-5},
}

GPT2_DEFAULTS = {  # GPT2Config options we compute only at their default
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
}


def hf_family(hf: dict) -> str:
    """The family of a config.json: its model_type, else its architectures entry."""
    arch = (hf.get("architectures") or [None])[0]
    family = hf.get("model_type") or {v: k for k, v in ARCHITECTURES.items()}.get(arch)
    if family not in ARCHITECTURES:
        raise ConfigError(
            f"config.json: model_type {hf.get('model_type')!r} (architectures {arch!r}) is not "
            f"supported; supported: {', '.join(ARCHITECTURES)}"
        )
    return family


def to_hf_config(
    cfg: ModelConfig, pad_token_id: int | None = None, torch_dtype: str = "float32"
) -> dict:
    """config.json contents for the model's own family (`cfg.arch`)."""
    out = {"architectures": [ARCHITECTURES[cfg.arch]], "model_type": cfg.arch}
    if cfg.arch == "gpt2":
        out.update({hf: getattr(cfg, ours) for ours, hf in GPT2_FIELDS.items()})
        out.update(GPT2_DEFAULTS, activation_function="gelu_new")
        out.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        out.update({hf: getattr(cfg, ours) for ours, hf in _fields(cfg.arch).items()})
        out.update(
            head_dim=cfg.head_dim,
            hidden_act="silu",
            attention_dropout=0.0,
            rope_scaling=dict(cfg.rope_scaling) or None,
        )
    if cfg.arch == "llama":
        out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif cfg.arch in ("qwen2", "qwen2_moe"):
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
    elif cfg.arch in ("mistral", "mixtral"):
        out.update(sliding_window=cfg.sliding_window or None)
    if cfg.arch == "mixtral":  # jitter noise only perturbs training; lmforge trains without it
        out.update(output_router_logits=False, router_jitter_noise=0.0)
    if cfg.arch == "qwen2_moe":  # every layer sparse; the dense width is unused, but required
        out.update(decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=True)
        out.update(intermediate_size=cfg.shared_expert_dim or cfg.ffn_dim)
        out.update(output_router_logits=False)
    out.update(use_cache=True, pad_token_id=pad_token_id, torch_dtype=torch_dtype)
    return out


def _fields(family: str) -> dict[str, str]:
    """Our ModelConfig field -> the config.json key, for a family."""
    tables = {"gpt2": GPT2_FIELDS, "mixtral": MIXTRAL_FIELDS, "qwen2_moe": QWEN2_MOE_FIELDS}
    return tables.get(family, CONFIG_FIELDS)


def _unsupported_options(hf: dict, family: str) -> list[str]:
    """Options in a config.json that would make transformers compute something we do not."""
    if family == "qwen2_moe":  # dense layers among the sparse ones; attention without biases
        bad = [f"mlp_only_layers={hf['mlp_only_layers']}"] if hf.get("mlp_only_layers") else []
        if hf.get("decoder_sparse_step", 1) != 1:
            bad.append(f"decoder_sparse_step={hf['decoder_sparse_step']}")
        if hf.get("qkv_bias") is False:
            bad.append("qkv_bias=false")
        return bad + _unsupported_options(hf, "qwen2")
    if family == "gpt2":
        bad = [f"{k}={hf[k]}" for k, v in GPT2_DEFAULTS.items() if hf.get(k, v) != v]
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            bad.append(f"activation_function={act}")
        return bad
    bad = [k for k in ("attention_bias", "mlp_bias") if hf.get(k)]
    if hf.get("hidden_act", "silu") != "silu":
        bad.append(f"hidden_act={hf['hidden_act']}")
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope = rope if isinstance(rope, dict) else {}  # not a mapping: from_hf_config names it
    partial = hf.get("partial_rotary_factor", rope.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):  # Llama, Qwen2 and Mistral rotate the whole head
        bad.append(f"partial_rotary_factor={partial}")
    window = hf.get("sliding_window")
    if family == "qwen2" and hf.get("use_sliding_window") and window is not None:
        n_layer, max_full = hf["num_hidden_layers"], hf.get("max_window_layers", 28)
        types = hf.get("layer_types") or [i >= max_full for i in range(n_layer)]
        slides = any(t is True or t == "sliding_attention" for t in types)
        if slides and window < hf.get("max_position_embeddings", 32768):
            bad.append(f"use_sliding_window=true with sliding_window={window}")
    return bad


def _rope_scaling(hf: dict) -> tuple[float | None, dict]:
    """config.json's rope_scaling as written, and the rope_theta inside it if any. transformers 5
    saves both as rope_parameters; ModelConfig holds rope_theta apart. The default kind is no
    scaling: {}."""
    scaling = hf.get("rope_scaling")
    if scaling is None:
        scaling = dict(hf.get("rope_parameters") or {})
        scaling.pop("partial_rotary_factor", None)  # checked by _unsupported_options: 1.0 here
    if not isinstance(scaling, dict):
        raise ConfigError(f"config.json: rope_scaling must be an object, got {scaling!r}")
    scaling = dict(scaling)
    theta = scaling.pop("rope_theta", None)
    return theta, ({} if rope_kind(scaling) == "default" else scaling)


def from_hf_config(hf: dict) -> ModelConfig:
    """ModelConfig from a config.json of a supported family; refuses what our model would compute
    differently, naming the field."""
    family = hf_family(hf)
    bad = _unsupported_options(hf, family)
    if bad:
        raise ConfigError(f"config.json: unsupported {family} options {bad}")
    hf = HF_DEFAULTS[family] | {k: v for k, v in hf.items() if v is not None}
    fields = _fields(family)
    kwargs = {ours: hf[theirs] for ours, theirs in fields.items() if theirs in hf}
    if family == "gpt2" and "n_positions" not in hf and "n_ctx" in hf:  # older GPT-2 configs
        kwargs["max_seq_len"] = hf["n_ctx"]
    if family != "gpt2":
        theta, kwargs["rope_scaling"] = _rope_scaling(hf)
        if theta is not None:  # transformers too prefers the rope dict's own rope_theta
            kwargs["rope_theta"] = theta
    for k in ("bos_token_id", "eos_token_id"):
        if isinstance(kwargs.get(k), list):  # several stop ids (Llama 3): keep the first
            kwargs[k] = kwargs[k][0]
    if family != "gpt2":
        kwargs["head_dim"] = hf.get("head_dim") or 0
    if family in ("mistral", "mixtral"):
        kwargs["sliding_window"] = hf.get("sliding_window") or 0
    try:
        cfg = ModelConfig(arch=family, **ARCH_FEATURES[family], **kwargs)
    except ConfigError as e:  # name the key as the file spells it too
        theirs = {f"model.{ours}": f"{k} in config.json" for ours, k in fields.items()}
        msg = str(e)
        for ours, k in theirs.items():
            msg = re.sub(rf"{re.escape(ours)}\b", f"{ours} ({k})", msg)
        raise ConfigError(f"config.json: {msg}") from None
    if cfg.vocab_size == 0:
        raise ConfigError(f"config.json: {fields['vocab_size']} must be positive, got 0")
    return cfg


# --------------------------------------------------------------------------- tensors


def to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> the tensor names of cfg.arch (contiguous copies, ready for safetensors)."""
    out = _to_gpt2(sd, cfg) if cfg.arch == "gpt2" else _to_llama(sd, cfg)
    return {k: v.detach().contiguous() for k, v in out.items()}


def _to_llama(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Llama, Qwen2 and Mistral share these names; Qwen2 adds q/k/v biases."""
    sizes = [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]
    out = {
        "model.embed_tokens.weight": sd["tok_emb.weight"],
        "model.norm.weight": sd["norm.weight"],
    }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        p, hp = f"layers.{i}.", f"model.layers.{i}."
        kinds = ("weight", "bias") if cfg.qkv_bias else ("weight",)
        for kind in kinds:
            q, k, v = sd[p + f"attn.wqkv.{kind}"].split(sizes, dim=0)
            out.update({hp + f"self_attn.{n}_proj.{kind}": t for n, t in zip("qkv", (q, k, v))})
        out.update(_to_moe(sd, p, hp, cfg) if cfg.mlp == "moe" else _to_llama_mlp(sd, p, hp))
        out.update(
            {
                hp + "self_attn.o_proj.weight": sd[p + "attn.wo.weight"],
                hp + "input_layernorm.weight": sd[p + "attn_norm.weight"],
                hp + "post_attention_layernorm.weight": sd[p + "mlp_norm.weight"],
            }
        )
    return out


def _to_llama_mlp(sd: dict, p: str, hp: str) -> dict:
    gate, up = sd[p + "mlp.w13.weight"].chunk(2, dim=0)
    return {
        hp + "mlp.gate_proj.weight": gate,
        hp + "mlp.up_proj.weight": up,
        hp + "mlp.down_proj.weight": sd[p + "mlp.w2.weight"],
    }


# family -> where a layer's MoE block is, and each expert's gate, up and down matrix names
MOE_NAMES = {
    "mixtral": ("block_sparse_moe.", "w1", "w3", "w2"),
    "qwen2_moe": ("mlp.", "gate_proj", "up_proj", "down_proj"),
}
SHARED = ("gate_proj", "up_proj", "down_proj")  # Qwen2-MoE's shared expert, a Llama MLP


def _to_moe(sd: dict, p: str, hp: str, cfg: ModelConfig) -> dict:
    """Our router and stacked experts -> one gate, up and down matrix per expert; Qwen2-MoE's
    shared expert and its gate."""
    block, g, u, d = MOE_NAMES[cfg.arch]
    hp += block
    out = {hp + "gate.weight": sd[p + "mlp.router.weight"]}
    for e, (w13, w2) in enumerate(zip(sd[p + "mlp.w13"], sd[p + "mlp.w2"])):
        gate, up = w13.chunk(2, dim=0)
        out |= {hp + f"experts.{e}.{g}.weight": gate, hp + f"experts.{e}.{u}.weight": up}
        out[hp + f"experts.{e}.{d}.weight"] = w2
    if cfg.shared_expert_dim:
        gate, up = sd[p + "mlp.shared_w13.weight"].chunk(2, dim=0)
        down = sd[p + "mlp.shared_w2.weight"]
        out |= {hp + f"shared_expert.{n}.weight": t for n, t in zip(SHARED, (gate, up, down))}
        out[hp + "shared_expert_gate.weight"] = sd[p + "mlp.shared_gate.weight"]
    return out


# our per-layer module -> GPT-2's; linear weights are transposed (Conv1D stores (in, out))
GPT2_LAYER = {
    "attn_norm": "ln_1",
    "attn.wqkv": "attn.c_attn",
    "attn.wo": "attn.c_proj",
    "mlp_norm": "ln_2",
    "mlp.w1": "mlp.c_fc",
    "mlp.w2": "mlp.c_proj",
}


def _to_gpt2(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {
        "transformer.wte.weight": sd["tok_emb.weight"],
        "transformer.wpe.weight": sd["pos_emb.weight"],
        "transformer.ln_f.weight": sd["norm.weight"],
        "transformer.ln_f.bias": sd["norm.bias"],
    }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        for ours, theirs in GPT2_LAYER.items():
            for kind in ("weight", "bias"):
                t = sd[f"layers.{i}.{ours}.{kind}"]
                linear = kind == "weight" and "norm" not in ours
                out[f"transformer.h.{i}.{theirs}.{kind}"] = t.t() if linear else t
    return out


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensors of cfg.arch -> our state dict. Missing tensors are an error naming them; extra
    ones (GPT-2's stored attention masks, rotary caches) are ignored."""
    missing = []

    def get(name):
        if name not in hf:
            missing.append(name)
        return hf.get(name)

    out = _from_gpt2(hf, get, cfg) if cfg.arch == "gpt2" else _from_llama(hf, get, cfg)
    out["lm_head.weight"] = out["tok_emb.weight"] if cfg.tie_embeddings else get("lm_head.weight")
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise ConfigError(f"checkpoint is missing tensors: {shown}")
    return out


def _cat(parts: list) -> torch.Tensor | None:
    return None if any(t is None for t in parts) else torch.cat(parts, dim=0)


def _from_llama(hf: dict, get, cfg: ModelConfig) -> dict:
    out = {
        "tok_emb.weight": get("model.embed_tokens.weight"),
        "norm.weight": get("model.norm.weight"),
    }
    for i in range(cfg.n_layer):
        p, hp = f"layers.{i}.", f"model.layers.{i}."
        out[p + "attn.wqkv.weight"] = _cat([get(hp + f"self_attn.{n}_proj.weight") for n in "qkv"])
        if cfg.qkv_bias:
            out[p + "attn.wqkv.bias"] = _cat([get(hp + f"self_attn.{n}_proj.bias") for n in "qkv"])
        out[p + "attn.wo.weight"] = get(hp + "self_attn.o_proj.weight")
        if cfg.mlp == "moe":
            out |= _from_moe(hf, get, p, hp, cfg)
        else:
            gate_up = [get(hp + f"mlp.{n}_proj.weight") for n in ("gate", "up")]
            out[p + "mlp.w13.weight"] = _cat(gate_up)
            out[p + "mlp.w2.weight"] = get(hp + "mlp.down_proj.weight")
        out[p + "attn_norm.weight"] = get(hp + "input_layernorm.weight")
        out[p + "mlp_norm.weight"] = get(hp + "post_attention_layernorm.weight")
    return out


def _from_moe(hf: dict, get, p: str, hp: str, cfg: ModelConfig) -> dict:
    """A layer's router and experts: one matrix per expert (`block_sparse_moe.experts.{i}.w1`,
    `mlp.experts.{i}.gate_proj`, ...), or stacked as transformers 5 holds them in memory
    (`mlp.experts.gate_up_proj`, (E, 2F, D): gate rows, then up, as our w13)."""
    block, g, u, d = MOE_NAMES[cfg.arch]
    if hp + "mlp.experts.gate_up_proj" in hf:
        out = {
            p + "mlp.router.weight": get(hp + "mlp.gate.weight"),
            p + "mlp.w13": get(hp + "mlp.experts.gate_up_proj"),
            p + "mlp.w2": get(hp + "mlp.experts.down_proj"),  # (E, D, F)
        }
    else:
        experts = [hp + block + f"experts.{e}." for e in range(cfg.n_experts)]
        w13 = [_cat([get(x + f"{g}.weight"), get(x + f"{u}.weight")]) for x in experts]
        w2 = [get(x + f"{d}.weight") for x in experts]
        stack = lambda ts: None if any(t is None for t in ts) else torch.stack(ts)  # noqa: E731
        out = {
            p + "mlp.router.weight": get(hp + block + "gate.weight"),
            p + "mlp.w13": stack(w13),
            p + "mlp.w2": stack(w2),
        }
    if cfg.shared_expert_dim:
        hp += block
        gate, up, down = (get(hp + f"shared_expert.{n}.weight") for n in SHARED)
        out[p + "mlp.shared_w13.weight"] = _cat([gate, up])
        out[p + "mlp.shared_w2.weight"] = down
        out[p + "mlp.shared_gate.weight"] = get(hp + "shared_expert_gate.weight")
    return out


def _from_gpt2(hf: dict, get, cfg: ModelConfig) -> dict:
    # openai-community/gpt2 itself was saved from GPT2Model: no `transformer.` prefix
    pre = "transformer." if "transformer.wte.weight" in hf or "wte.weight" not in hf else ""
    out = {
        "tok_emb.weight": get(pre + "wte.weight"),
        "pos_emb.weight": get(pre + "wpe.weight"),
        "norm.weight": get(pre + "ln_f.weight"),
        "norm.bias": get(pre + "ln_f.bias"),
    }
    for i in range(cfg.n_layer):
        for ours, theirs in GPT2_LAYER.items():
            for kind in ("weight", "bias"):
                t = get(f"{pre}h.{i}.{theirs}.{kind}")
                linear = t is not None and kind == "weight" and "norm" not in ours
                out[f"layers.{i}.{ours}.{kind}"] = t.t().contiguous() if linear else t
    return out
