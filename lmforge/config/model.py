"""The model the run starts from: `model:` (the architecture, with its rope-scaling and memory
checks) and `base:` (an existing model instead of pretraining one)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from lmforge.config.base import ConfigError, check_choice, check_positive, check_types

# What each Hugging Face family computes. `arch` names the family a checkpoint is saved as; the
# model itself branches only on the features (norm, mlp, pos, biases), so they must match it.
ARCH_FEATURES = {
    "llama": dict(norm="rmsnorm", mlp="swiglu", pos="rope", qkv_bias=False, bias=False),
    "qwen2": dict(norm="rmsnorm", mlp="swiglu", pos="rope", qkv_bias=True, bias=False),
    "mistral": dict(norm="rmsnorm", mlp="swiglu", pos="rope", qkv_bias=False, bias=False),
    "gpt2": dict(norm="layernorm", mlp="gelu", pos="learned", qkv_bias=True, bias=True),
    # a sparse mixture of SwiGLU experts in place of the MLP (model/moe.py)
    "mixtral": dict(norm="rmsnorm", mlp="moe", pos="rope", qkv_bias=False, bias=False),
    # the same with Qwen2's attention biases and a shared expert beside the routed ones
    "qwen2_moe": dict(norm="rmsnorm", mlp="moe", pos="rope", qkv_bias=True, bias=False),
    # an encoder (model/bert.py, not GPT): `lmforge pretrain` trains it with masked-LM
    # (train/mlm.py); its GELU is BERT's exact one
    "bert": dict(norm="layernorm", mlp="gelu", pos="learned", qkv_bias=True, bias=True),
    # a state-space decoder (model/mamba.py, not GPT): it has no attention or MLP, so these are
    # the defaults (a recipe sets only arch); it reads dim, n_layer, norm_eps, init_std,
    # tie_embeddings and max_seq_len, with transformers' d_state 16, expand 2, conv_kernel 4
    "mamba": dict(norm="rmsnorm", mlp="swiglu", pos="rope", qkv_bias=False, bias=False),
    # an encoder-decoder (model/t5.py, not GPT): `lmforge pretrain` trains it with span
    # corruption (train/span.py); these are the defaults (a recipe sets only arch). It reads dim,
    # n_layer (each stack), n_head, head_dim (d_kv), ffn_dim (gated GELU), norm_eps,
    # tie_embeddings and init_std; positions are T5's relative bias (32 buckets, distance 128)
    "t5": dict(norm="rmsnorm", mlp="swiglu", pos="rope", qkv_bias=False, bias=False),
}
ENCODERS = ("bert",)  # the archs that are encoders
SSMS = ("mamba",)  # the archs that are state-space decoders; every other arch is a GPT
SEQ2SEQ = ("t5",)  # the archs that are encoder-decoders


def model_family(cfg: ModelConfig) -> str:
    """ "encoder", "ssm", "seq2seq" or "decoder": which model and which training objective the
    config asks for (an ssm trains on the decoder's next-token objective with its own model
    class; a seq2seq model on span corruption)."""
    if cfg.arch in SEQ2SEQ:
        return "seq2seq"
    if cfg.arch in SSMS:
        return "ssm"
    return "encoder" if cfg.arch in ENCODERS else "decoder"


# building a model module by module takes about a millisecond a layer: a million layers (a typo)
# would hang for minutes before any memory check could help
MAX_LAYERS = 1024


@dataclass
class ModelConfig:  # `model:` a decoder-only Transformer; the fields map onto LlamaConfig (or kin)
    vocab_size: int = 0  # 0 = take it from the tokenizer
    dim: int = 256  # hidden_size
    n_layer: int = 4  # num_hidden_layers
    n_head: int = 4  # num_attention_heads
    n_kv_head: int = 0  # num_key_value_heads (grouped-query attention); 0 = n_head
    head_dim: int = 0  # width of one attention head; 0 = dim / n_head
    ffn_dim: int = 0  # intermediate_size; 0 = 8/3 * dim rounded up to 64s (swiglu), 4 * dim (gelu)
    max_seq_len: int = 512  # max_position_embeddings
    rope_theta: float = 10000.0  # rotary embedding base
    norm_eps: float = 1e-5  # rms_norm_eps (layer_norm_epsilon for layernorm)
    tie_embeddings: bool = True  # tie_word_embeddings: input embedding = output head
    init_std: float = 0.02  # initializer_range
    bos_token_id: int = 1  # set from the tokenizer by the pipeline
    eos_token_id: int = 2  # set from the tokenizer by the pipeline
    arch: str = "llama"  # HF family of the checkpoint: llama | qwen2 | mistral | mixtral | qwen2_moe (mixtures of experts) | gpt2 | bert (an encoder, pretrained with masked-LM) | mamba (a state-space decoder) | t5 (an encoder-decoder, pretrained with span corruption)
    norm: str = "rmsnorm"  # rmsnorm | layernorm (gpt2)
    mlp: str = "swiglu"  # swiglu (gated) | gelu (gpt2: tanh-approximate GELU, not gated) | moe (mixtral, qwen2_moe: top-k routed SwiGLU experts)
    pos: str = "rope"  # positions: rope | learned (gpt2: a table added to the token embeddings)
    qkv_bias: bool = False  # the q/k/v projections have biases (qwen2, gpt2)
    bias: bool = False  # every other linear layer and the norms have biases (gpt2)
    sliding_window: int = 0  # attend to at most this many latest positions (mistral); 0 = all
    # kept as config.json writes it: {rope_type: linear | dynamic | yarn | llama3, factor, ...};
    # model/transformer.py rope_frequencies computes each kind
    rope_scaling: dict = field(default_factory=dict)  # HF rope_scaling (a mapping); {} = none
    # mixture of experts (mlp: moe, model/moe.py); ffn_dim is then each expert's width
    n_experts: int = 0  # num_local_experts: SwiGLU experts per layer (mlp moe needs >= 2)
    experts_per_token: int = 2  # num_experts_per_tok: the top-k experts each token goes to
    moe_aux_coef: float = 0.01  # router_aux_loss_coef: load-balancing loss weight in training
    moe_z_coef: float = 0.001  # router z-loss (ST-MoE) weight in training
    capacity_factor: float = 0.0  # expert slots = factor * tokens * k / n_experts; 0 = no drops
    norm_topk: bool = True  # norm_topk_prob: top-k weights renormalised (qwen2_moe: false)
    shared_expert_dim: int = 0  # shared_expert_intermediate_size (qwen2_moe); 0 = none

    def __post_init__(self):
        check_types(self)  # config.json values arrive unchecked: "256" or true for a width
        _check_rope_scaling(self.rope_scaling)
        check_choice(self, "arch", tuple(ARCH_FEATURES))
        check_choice(self, "norm", ("rmsnorm", "layernorm"))
        check_choice(self, "mlp", ("swiglu", "gelu", "moe"))
        check_choice(self, "pos", ("rope", "learned"))
        wrong = {k: v for k, v in ARCH_FEATURES[self.arch].items() if getattr(self, k) != v}
        if wrong:
            need = ", ".join(f"{k}: {str(v).lower()}" for k, v in wrong.items())
            raise ConfigError(f"model.arch {self.arch!r} computes with {need}; set those too")
        if self.arch in ENCODERS:
            _check_encoder(self)
        if self.arch in SEQ2SEQ:
            _check_seq2seq(self)
        if self.sliding_window and self.arch not in ("mistral", "mixtral"):
            raise ConfigError(
                f"model.sliding_window needs arch 'mistral' or 'mixtral', not {self.arch!r}"
            )
        _check_moe(self)
        check_positive(self, "dim", "n_layer", "n_head", "max_seq_len")
        for name in (
            "vocab_size",
            "n_kv_head",
            "head_dim",
            "ffn_dim",
            "bos_token_id",
            "eos_token_id",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("rope_theta", "norm_eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.init_std < 0:
            raise ConfigError(f"model.init_std must be >= 0, got {self.init_std}")
        if self.n_layer > MAX_LAYERS:
            raise ConfigError(
                f"model.n_layer ({self.n_layer}) is over {MAX_LAYERS}: deeper than any published "
                f"model (about 130 layers), so most likely a typo"
            )
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.head_dim == 0 and self.dim % self.n_head:
            raise ConfigError(
                f"model.dim ({self.dim}) must be divisible by model.n_head ({self.n_head})"
            )
        self.head_dim = self.head_dim or self.dim // self.n_head
        if self.ffn_dim == 0:
            gated = 64 * -(-(8 * self.dim // 3) // 64)  # SwiGLU's 8/3 keeps the parameter count
            self.ffn_dim = 4 * self.dim if self.mlp == "gelu" else gated
        check_positive(self, "n_kv_head", "head_dim", "ffn_dim")
        if self.sliding_window < 0:
            raise ConfigError(f"model.sliding_window must be >= 0, got {self.sliding_window}")
        if self.n_head % self.n_kv_head:
            raise ConfigError(
                f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.n_kv_head})"
            )
        if self.pos == "rope" and self.head_dim % 2:
            raise ConfigError(
                f"model.head_dim ({self.head_dim}) must be even for rotary embeddings"
            )
        plain_mha = self.head_dim * self.n_head == self.dim and self.n_kv_head == self.n_head
        if self.arch == "gpt2" and not plain_mha:  # HF's c_attn is three dim x dim blocks
            raise ConfigError("gpt2 needs model.head_dim = dim / n_head and n_kv_head = n_head")


def _check_moe(cfg: ModelConfig) -> None:
    """The expert fields are set for a mixture of experts, and only for one."""
    if cfg.mlp != "moe":
        if cfg.n_experts or cfg.capacity_factor or cfg.shared_expert_dim:
            raise ConfigError(
                f"model.n_experts, model.capacity_factor and model.shared_expert_dim need mlp "
                f"'moe' (arch 'mixtral' or 'qwen2_moe'), not mlp {cfg.mlp!r}"
            )
        return
    if cfg.arch == "mixtral" and (cfg.shared_expert_dim or not cfg.norm_topk):
        raise ConfigError(
            "model.arch 'mixtral' has no shared expert and always renormalises the top-k "
            "weights: use arch 'qwen2_moe' for shared_expert_dim or norm_topk false"
        )
    if cfg.shared_expert_dim < 0:
        raise ConfigError(f"model.shared_expert_dim must be >= 0, got {cfg.shared_expert_dim}")
    if cfg.n_experts < 2:
        raise ConfigError(f"model.n_experts must be >= 2 for mlp 'moe', got {cfg.n_experts}")
    if not 1 <= cfg.experts_per_token <= cfg.n_experts:
        raise ConfigError(
            f"model.experts_per_token ({cfg.experts_per_token}) must be between 1 and "
            f"model.n_experts ({cfg.n_experts})"
        )
    for name in ("moe_aux_coef", "moe_z_coef", "capacity_factor"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"model.{name} must be >= 0, got {getattr(cfg, name)}")


def _check_encoder(cfg: ModelConfig) -> None:
    """An encoder (BERT) has none of the decoder's options: refuse them rather than ignore them."""
    unused = {"n_kv_head": cfg.n_head, "head_dim": cfg.dim // cfg.n_head, "sliding_window": 0}
    bad = [k for k, ok in unused.items() if getattr(cfg, k) not in (0, ok)]
    bad += ["rope_scaling"] if cfg.rope_scaling else []
    bad += [] if cfg.tie_embeddings else ["tie_embeddings"]  # BERT's MLM decoder is tied
    if bad:
        raise ConfigError(f"model.arch {cfg.arch!r} is an encoder: {', '.join(bad)} do not apply")


def _check_seq2seq(cfg: ModelConfig) -> None:
    """T5 has no grouped-query attention, sliding window, rotary scaling or experts: refuse them
    rather than ignore them."""
    bad = [k for k in ("sliding_window", "n_experts") if getattr(cfg, k)]
    bad += ["n_kv_head"] if cfg.n_kv_head not in (0, cfg.n_head) else []
    bad += ["rope_scaling"] if cfg.rope_scaling else []
    if bad:
        raise ConfigError(
            f"model.arch {cfg.arch!r} is an encoder-decoder (T5): {', '.join(bad)} do not apply"
        )


# rope_scaling kinds we compute -> the numbers each needs (transformers' names)
ROPE_SCALING = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
# optional numbers of a kind; any other key is an error, so a setting is never silently ignored
ROPE_SCALING_OPTIONAL = {
    "yarn": (
        "original_max_position_embeddings",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
    ),
    "dynamic": ("original_max_position_embeddings",),
}


def _check_rope_scaling(s) -> None:
    """A rope_scaling dict names a kind we compute and the numbers that kind needs."""
    if not isinstance(s, dict):
        raise ConfigError(f"model.rope_scaling must be a mapping (or {{}} for none), got {s!r}")
    if not s:
        return
    kind = s.get("rope_type", s.get("type", "default"))
    if kind == "default":
        return
    if kind not in ROPE_SCALING:
        raise ConfigError(
            f"model.rope_scaling: rope_type {kind!r} is not supported; supported: "
            f"{', '.join(ROPE_SCALING)}"
        )
    needed, optional = ROPE_SCALING[kind], ROPE_SCALING_OPTIONAL.get(kind, ())
    missing = [k for k in needed if k not in s]
    if missing:
        raise ConfigError(f"model.rope_scaling ({kind}) is missing {', '.join(missing)}")
    known = {"rope_type", "type", "truncate", *needed, *optional}
    extra = sorted(set(s) - known)
    if extra:
        raise ConfigError(
            f"model.rope_scaling ({kind}): {', '.join(extra)} not supported; known: "
            f"{', '.join(sorted(known))}"
        )
    for k in (*needed, *optional):
        v = s.get(k)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ConfigError(
                f"model.rope_scaling ({kind}): {k} must be a positive number, got {v!r}"
            )
    if kind == "llama3" and not s["high_freq_factor"] > s["low_freq_factor"]:
        raise ConfigError(
            "model.rope_scaling (llama3): high_freq_factor must be greater than low_freq_factor"
        )


def model_memory(cfg: ModelConfig) -> dict[str, int]:
    """Bytes that building `cfg` in float32 takes, by part: the parameters (tied embeddings
    counted once) and the rotary tables, two (max_seq_len, head_dim) buffers, which a long
    context makes large however small the model."""
    D, F, H, KV, hd = cfg.dim, cfg.ffn_dim, cfg.n_head, cfg.n_kv_head, cfg.head_dim
    norm = D * (2 if cfg.norm == "layernorm" and cfg.bias else 1)
    layer = D * (H + 2 * KV) * hd + H * hd * D + 2 * norm  # attention, two norms
    layer += (2 if cfg.mlp == "gelu" else 3) * D * F * max(1, cfg.n_experts)  # up, down | gate too
    layer += cfg.n_experts * D  # the router
    layer += 3 * D * cfg.shared_expert_dim + (D if cfg.shared_expert_dim else 0)  # and its gate
    if cfg.qkv_bias:
        layer += (H + 2 * KV) * hd
    if cfg.bias:  # output projection and MLP biases
        layer += D + D + (F if cfg.mlp == "gelu" else 2 * F)
    params = cfg.n_layer * layer + norm + cfg.vocab_size * D * (1 if cfg.tie_embeddings else 2)
    if cfg.pos == "learned":
        params += cfg.max_seq_len * D
    rope = 2 * cfg.max_seq_len * hd if cfg.pos == "rope" else 0
    return {"parameters": 4 * params, "rotary tables": 4 * rope}


def physical_memory() -> int | None:
    """This machine's RAM in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_model_fits(cfg: ModelConfig, limit: int | None = None, shards: int = 1) -> None:
    """Refuse, before allocating anything, a model whose float32 parameters and buffers exceed
    `limit` bytes (default: this machine's RAM), naming the fields that make it that big. With
    `shards` ranks sharing the parameters (FSDP), each holds only its part of them."""
    limit = limit or physical_memory()
    parts = model_memory(cfg)
    parts["parameters"] //= max(1, shards)
    total = sum(parts.values())
    if not limit or total <= limit:
        return
    gb = lambda n: f"{n / 2**30:,.1f} GB"  # noqa: E731
    shown = ", ".join(f"{k} {gb(v)}" for k, v in parts.items() if v)
    if parts["rotary tables"] > parts["parameters"]:
        fields = f"model.max_seq_len ({cfg.max_seq_len})"
    else:
        fields = ", ".join(
            f"model.{k} ({getattr(cfg, k)})" for k in ("n_layer", "dim", "ffn_dim", "vocab_size")
        )
    raise ConfigError(
        f"model: building it would take about {gb(total)} ({shown}), more than this machine's "
        f"{gb(limit)} of memory; check {fields}"
    )


@dataclass
class BaseConfig:  # `base:` start `lmforge run` from an existing model instead of pretraining one
    model: str = ""  # a name `lmforge fetch` knows (smollm2-135m-instruct) or a model directory; "" = pretrain from scratch
