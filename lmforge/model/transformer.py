"""A decoder-only Transformer: by default LLaMA-style (RMSNorm, rotary embeddings, grouped-query
attention, SwiGLU MLP, optional tied embeddings); a few config features also make it Qwen2
(q/k/v biases), Mistral (sliding-window attention, explicit head_dim) or GPT-2 (LayerNorm with
bias, learned positions `pos_emb`, GELU MLP, biases on every linear).

The one idea: the math is exactly transformers' (`LlamaForCausalLM` and kin: same RoPE
convention, same norm placement), so a checkpoint converts by renaming tensors. The only layout
difference is that q/k/v are stored fused as `wqkv` (rows q, then k, then v; its bias likewise)
and SwiGLU's gate/up as `w13`: one matmul instead of three or two, which matters on CPUs and for
batch-1 decoding. GPT-2's MLP is `w1` -> GELU -> `w2`, and its Conv1D weights are stored
transposed, as nn.Linear (out, in). `model/hf.py` splits, concatenates and transposes.
The model branches on features (`cfg.norm`, `cfg.mlp`, `cfg.pos`, biases), never on the family.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.config import ConfigError, ModelConfig, check_model_fits
from lmforge.model.moe import MoE


def rope_tables(
    head_dim: int, max_seq_len: int, theta: float, scaling: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin, both (max_seq_len, head_dim) in float32 (HF computes them in fp32 too).
    HF rotates with `x * cos + rotate_half(x) * sin`, rotate_half(x) = (-x2, x1); folding that
    minus sign into the table's first half leaves a plain swap of halves for `apply_rope`.
    `scaling` is config.json's rope_scaling (see `rope_frequencies`); yarn also scales both tables."""
    inv_freq, attention_factor = rope_frequencies(head_dim, max_seq_len, theta, scaling or {})
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos() * attention_factor, angles.sin() * attention_factor
    return cos.repeat(1, 2), torch.cat((-sin, sin), dim=-1)


def rope_frequencies(
    head_dim: int, max_seq_len: int, theta: float, scaling: dict
) -> tuple[torch.Tensor, float]:
    """The (head_dim / 2,) inverse frequencies and the factor on cos/sin, for each rope_scaling kind
    as transformers' modeling_rope_utils computes them. `dynamic` (NTK) recomputes the base only for
    sequences longer than max_position_embeddings, which our context (max_seq_len) never is, so it
    is exactly the unscaled table here."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = rope_kind(scaling)
    if kind in ("default", "dynamic"):
        return inv_freq, 1.0
    if kind == "linear":  # positions / factor, the same as frequencies / factor
        return inv_freq / float(scaling["factor"]), 1.0
    if kind == "llama3":
        return _llama3_frequencies(inv_freq, scaling), 1.0
    return _yarn_frequencies(head_dim, max_seq_len, theta, scaling)


def rope_kind(scaling: dict) -> str:
    """A rope_scaling dict's kind: `rope_type`, or the older key `type`; none is "default"."""
    return scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"


def _llama3_frequencies(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1: wavelengths longer than original / low_freq_factor are slowed by `factor`,
    shorter than original / high_freq_factor kept, the band between blended smoothly."""
    factor, low, high = (
        float(s["factor"]),
        float(s["low_freq_factor"]),
        float(s["high_freq_factor"]),
    )
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def _yarn_frequencies(
    dim: int, max_seq_len: int, base: float, s: dict
) -> tuple[torch.Tensor, float]:
    """YaRN: a linear ramp over the dimensions between beta_fast and beta_slow rotations (within
    the original context) blends interpolated (/ factor) and original frequencies; cos and sin are
    scaled by `attention_factor`, by default 0.1 ln(factor) + 1."""
    original = s.get("original_max_position_embeddings") or max_seq_len
    factor = s.get("factor") or max_seq_len / original

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attention_factor = (
            mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
        )

    def correction_dim(rotations):  # the dimension that turns `rotations` times in `original`
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolate = 1 - ramp  # 1: keep the original frequency, 0: interpolate
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attention_factor)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2), HF's convention, in three kernels (cat, mul, addcmul) rather than
    seven: this runs on every q and k in training. x (B, T, H, D), cos/sin (T, 1, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.addcmul(x * cos, torch.cat((x2, x1), dim=-1), sin).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "layernorm":  # GPT-2: in the model's dtype, as transformers runs it
        return nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, bias=cfg.bias)
    return RMSNorm(cfg.dim, cfg.norm_eps)


class KVCache:
    """Preallocated keys and values, one (B, n_kv_head, max_len, head_dim) buffer per layer."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=None):
        shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.max_len = max_len

    def rows(self, start: int, n: int) -> KVCache:
        """A view of batch rows [start, start+n): writes through it land in this cache."""
        view = KVCache.__new__(KVCache)
        view.k = [t.narrow(0, start, n) for t in self.k]
        view.v = [t.narrow(0, start, n) for t in self.v]
        view.max_len = self.max_len
        return view

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: int):
        """Write k/v (B, KV, T, D) at positions [pos, pos+T); return everything up to pos+T."""
        T = k.shape[2]
        self.k[layer].narrow(2, pos, T).copy_(k)  # narrow + copy_: no Python indexing per token
        self.v[layer].narrow(2, pos, T).copy_(v)
        return self.k[layer].narrow(2, 0, pos + T), self.v[layer].narrow(2, 0, pos + T)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.window = cfg.sliding_window
        qkv_dim = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, qkv_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.dim, bias=cfg.bias)

    def forward(self, x, cos, sin, cache: KVCache | None = None, pos: int = 0):
        B, T, _ = x.shape
        H, KV, D = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.wqkv(x).view(B, T, H + 2 * KV, D)
        qk = qkv[:, :, : H + KV]
        if cos is not None:  # rotary positions (learned ones were added to the input instead)
            qk = apply_rope(qk, cos, sin)  # q and k heads rotate together
        q, k = qk.transpose(1, 2).split([H, KV], dim=1)  # (B, H, T, D), (B, KV, T, D)
        v = qkv[:, :, H + KV :].transpose(1, 2)  # (B, KV, T, D)
        if cache is not None:
            k, v = cache.update(self.layer, k, v, pos)  # (B, KV, pos+T, D)
        S = k.shape[2]  # keys: pos + T
        if self.window and S > self.window:  # Mistral: query i sees keys (i - window, i]
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device)
            mask = mask.tril(S - T).triu(S - T - self.window + 1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=H != KV)
        elif T == 1:  # one new token sees every cached position: no mask needed
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=H != KV)
        elif S == T:  # no history: plain causal
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != KV)
        else:  # a chunk after history: SDPA's is_causal aligns top-left, so spell the mask out
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=H != KV)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * D))


class MLP(nn.Module):
    """SwiGLU: w2(silu(gate) * up)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.ffn_dim, bias=cfg.bias)  # gate and up, fused
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=cfg.bias)  # down

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class GeluMLP(nn.Module):
    """GPT-2's MLP: w2(gelu(w1 x)), tanh-approximate GELU (transformers' `gelu_new`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=cfg.bias)  # HF c_fc
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=cfg.bias)  # HF c_proj

    def forward(self, x):
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


# cfg.mlp -> the block's feed-forward module; each maps (B, T, dim) -> (B, T, dim)
MLPS = {"swiglu": MLP, "gelu": GeluMLP, "moe": MoE}


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLPS[cfg.mlp](cfg)

    def forward(self, x, cos, sin, cache=None, pos=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, pos)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ConfigError(
                "model.vocab_size must be set (the pipeline takes it from the tokenizer)"
            )
        target = torch.get_default_device()
        # before anything is allocated: a typo must not swap for minutes. A model built on the
        # meta device may be sharded over the torchrun ranks, each then holding only its part
        shards = int(os.environ.get("WORLD_SIZE", "1")) if target.type == "meta" else 1
        check_model_fits(cfg, shards=shards)
        self.cfg = cfg
        with torch.device("meta"):  # no default initialisation: reset_parameters draws each weight
            self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
            self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.dim) if cfg.pos == "learned" else None
            self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
            self.norm = make_norm(cfg)
            self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # recompute each block's activations in the backward pass instead of keeping them
        self.activation_checkpointing = False
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.pos == "rope":
            cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        if target.type != "meta":  # a meta model is filled later (a checkpoint, or sharded init)
            self.to_empty(device=target)
            if cfg.tie_embeddings:  # to_empty gives each module its own new tensor
                self.lm_head.weight = self.tok_emb.weight
            self.reset_buffers()
            self.reset_parameters()

    def reset_parameters(self):
        for name, p in self.named_parameters():
            self.init_weight(name, p)

    def init_weight(self, name: str, t: torch.Tensor) -> None:
        """Initialise parameter `name` (or a full-size tensor standing for it) in place. The
        residual-stream writers (wo, w2, the experts' stacked w2) get std / sqrt(2 * n_layer), as
        in GPT-2: the sum of 2 * n_layer residual branches then keeps unit-order variance at
        initialisation."""
        std = self.cfg.init_std
        if name.endswith("norm.weight"):
            nn.init.ones_(t)
        elif name.endswith("bias"):
            nn.init.zeros_(t)
        elif name.endswith(("wo.weight", "w2.weight", "mlp.w2")):
            nn.init.normal_(t, 0.0, std / math.sqrt(2 * self.cfg.n_layer))
        else:
            nn.init.normal_(t, 0.0, std)

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """The rotary tables, computed again on the model's device."""
        if self.cfg.pos == "rope":
            c = self.cfg
            cos, sin = rope_tables(c.head_dim, c.max_seq_len, c.rope_theta, c.rope_scaling)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def forward(
        self, idx: torch.Tensor, cache: KVCache | None = None, pos: int = 0, last_only: bool = False
    ):
        """idx (B, T) token ids at positions [pos, pos+T) -> logits (B, T, V), or (B, 1, V) if last_only."""
        x = self.features(idx, cache, pos)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(x)  # (B, T, V)

    def features(self, idx: torch.Tensor, cache: KVCache | None = None, pos: int = 0):
        """The final normed hidden states (B, T, dim): what the output head reads, and what a
        reward model's or value head's scalar head reads instead."""
        B, T = idx.shape
        assert pos + T <= self.cfg.max_seq_len, (
            f"sequence of {pos + T} tokens exceeds the model's context of {self.cfg.max_seq_len}"
        )
        x = self.tok_emb(idx)  # (B, T, dim)
        cos = sin = None
        if self.pos_emb is None:
            cos = self.rope_cos[pos : pos + T].unsqueeze(1)  # (T, 1, D): broadcasts over heads
            sin = self.rope_sin[pos : pos + T].unsqueeze(1)
        else:  # GPT-2: a learned vector per absolute position, added once at the input
            x = x + self.pos_emb.weight[pos : pos + T]
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and cache is None
        for block in self.layers:
            if recompute:
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, pos)
        return self.norm(x)

    @property
    def device(self) -> torch.device:
        """Where the model lives (read off the final norm: a float parameter in every variant,
        quantized ones included)."""
        return self.norm.weight.device

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        p = self.norm.weight
        return KVCache(self.cfg, batch_size, max_len or self.cfg.max_seq_len, p.device, p.dtype)


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """The sum of the auxiliary training losses the model's modules left from their last forward
    (a module adds one by setting `aux_loss`, as a mixture of experts does); None when none has."""
    losses = [m.aux_loss for m in model.modules() if getattr(m, "aux_loss", None) is not None]
    return sum(losses) if losses else None


def aux_metrics(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each number the model's modules reported in their last forward (`aux_metrics`), averaged
    over the modules that reported it (a mixture of experts' layers); {} for a dense model."""
    per_key: dict[str, list[torch.Tensor]] = {}
    for m in model.modules():
        for k, v in (getattr(m, "aux_metrics", None) or {}).items():
            per_key.setdefault(k, []).append(v.float())
    return {k: torch.stack(vs).mean() for k, vs in per_key.items()}


# --------------------------------------------------------------------------- size and cost


def num_params(model: nn.Module, non_embedding: bool = False) -> int:
    """Unique parameters (tied weights counted once); non_embedding drops the input tables."""
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    if non_embedding and isinstance(model, GPT):
        if not model.cfg.tie_embeddings:
            n -= model.tok_emb.weight.numel()
        if model.pos_emb is not None:
            n -= model.pos_emb.weight.numel()
    return n


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> float:
    """Matmul FLOPs per token: 2 per weight (forward), x3 with backward, plus attention scores
    (QK^T and AV over on average seq_len/2 causal keys is counted as seq_len, the PaLM convention)."""
    D, F_ = cfg.dim, cfg.ffn_dim
    per_layer = (
        2 * D * (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim + 2 * cfg.n_head * cfg.head_dim * D
    )
    # gate, up, down | up, down; a mixture of experts runs k of its experts, and the router
    active = cfg.experts_per_token if cfg.mlp == "moe" else 1
    per_layer += 2 * (2 if cfg.mlp == "gelu" else 3) * D * F_ * active
    per_layer += 2 * D * cfg.n_experts + 2 * 3 * D * cfg.shared_expert_dim  # router, shared expert
    per_layer += 2 * 2 * cfg.n_head * cfg.head_dim * seq_len  # scores and weighted sum
    fwd = cfg.n_layer * per_layer + 2 * D * cfg.vocab_size  # + output head
    return 3 * fwd if training else fwd
