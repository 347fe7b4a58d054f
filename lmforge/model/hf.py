"""Hugging Face interop: our ModelConfig <-> LlamaConfig fields, our tensors <-> HF tensor names.

The one idea: names and shapes are all that differ. HF stores q/k/v and gate/up as separate
matrices; we keep them fused, so export splits along the output dimension and import concatenates.
RoPE needs no permutation because our rotation already uses HF's rotate_half pairing.
"""

from __future__ import annotations

import torch

from lmforge.config import ConfigError, ModelConfig

# our ModelConfig field -> LlamaConfig field
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


def to_hf_config(
    cfg: ModelConfig, pad_token_id: int | None = None, torch_dtype: str = "float32"
) -> dict:
    """config.json contents for `LlamaForCausalLM`."""
    out = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    out.update({hf: getattr(cfg, ours) for ours, hf in CONFIG_FIELDS.items()})
    out.update(
        head_dim=cfg.head_dim,
        hidden_act="silu",
        attention_bias=False,
        attention_dropout=0.0,
        mlp_bias=False,
        pretraining_tp=1,
        rope_scaling=None,
        use_cache=True,
        pad_token_id=pad_token_id,
        torch_dtype=torch_dtype,
    )
    return out


def from_hf_config(hf: dict) -> ModelConfig:
    """ModelConfig from a LlamaConfig dict; refuses what our model would compute differently."""
    arch = (hf.get("architectures") or ["?"])[0]
    if hf.get("model_type", "llama") != "llama":
        raise ConfigError(
            f"config.json: model_type {hf.get('model_type')!r} ({arch}) is not supported yet; expected 'llama'"
        )
    unsupported = {
        "rope_scaling": hf.get("rope_scaling"),
        "attention_bias": hf.get("attention_bias"),
        "mlp_bias": hf.get("mlp_bias"),
    }
    bad = [k for k, v in unsupported.items() if v]
    if hf.get("hidden_act", "silu") != "silu":
        bad.append(f"hidden_act={hf['hidden_act']}")
    rope_params = hf.get("rope_parameters") or {}
    if rope_params.get("rope_type", "default") != "default":
        bad.append(f"rope_type={rope_params['rope_type']}")
    if bad:
        raise ConfigError(f"config.json: unsupported Llama options {bad}")
    kwargs = {
        ours: hf[theirs] for ours, theirs in CONFIG_FIELDS.items() if hf.get(theirs) is not None
    }
    if "rope_theta" not in kwargs and "rope_theta" in rope_params:
        kwargs["rope_theta"] = rope_params["rope_theta"]
    head_dim = hf.get("head_dim")
    if head_dim and head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
        raise ConfigError(
            "config.json: head_dim * num_attention_heads != hidden_size is not supported"
        )
    return ModelConfig(**kwargs)


def to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> HF LlamaForCausalLM tensor names (contiguous copies, ready for safetensors)."""
    H, KV, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    out = {
        "model.embed_tokens.weight": sd["tok_emb.weight"],
        "model.norm.weight": sd["norm.weight"],
    }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        p, hp = f"layers.{i}.", f"model.layers.{i}."
        q, k, v = sd[p + "attn.wqkv.weight"].split([H * D, KV * D, KV * D], dim=0)
        gate, up = sd[p + "mlp.w13.weight"].chunk(2, dim=0)
        out.update(
            {
                hp + "self_attn.q_proj.weight": q,
                hp + "self_attn.k_proj.weight": k,
                hp + "self_attn.v_proj.weight": v,
                hp + "self_attn.o_proj.weight": sd[p + "attn.wo.weight"],
                hp + "mlp.gate_proj.weight": gate,
                hp + "mlp.up_proj.weight": up,
                hp + "mlp.down_proj.weight": sd[p + "mlp.w2.weight"],
                hp + "input_layernorm.weight": sd[p + "attn_norm.weight"],
                hp + "post_attention_layernorm.weight": sd[p + "mlp_norm.weight"],
            }
        )
    return {k: v.detach().contiguous() for k, v in out.items()}


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF LlamaForCausalLM tensors -> our state dict. Missing tensors are an error naming them."""
    missing = []

    def get(name):
        if name not in hf:
            missing.append(name)
            return None
        return hf[name]

    out = {
        "tok_emb.weight": get("model.embed_tokens.weight"),
        "norm.weight": get("model.norm.weight"),
    }
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["tok_emb.weight"]
    else:
        out["lm_head.weight"] = get("lm_head.weight")
    for i in range(cfg.n_layer):
        p, hp = f"layers.{i}.", f"model.layers.{i}."
        qkv = [get(hp + f"self_attn.{n}_proj.weight") for n in "qkv"]
        gate_up = [get(hp + f"mlp.{n}_proj.weight") for n in ("gate", "up")]
        if None in qkv or None in gate_up:
            continue
        out[p + "attn.wqkv.weight"] = torch.cat(qkv, dim=0)
        out[p + "attn.wo.weight"] = get(hp + "self_attn.o_proj.weight")
        out[p + "mlp.w13.weight"] = torch.cat(gate_up, dim=0)
        out[p + "mlp.w2.weight"] = get(hp + "mlp.down_proj.weight")
        out[p + "attn_norm.weight"] = get(hp + "input_layernorm.weight")
        out[p + "mlp_norm.weight"] = get(hp + "post_attention_layernorm.weight")
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise ConfigError(f"checkpoint is missing tensors: {shown}")
    return out
