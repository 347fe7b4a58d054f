"""An encoder-decoder Transformer of the T5 family, its Hugging Face interop and greedy decoding.

The one idea: T5 (Raffel et al., arXiv:1910.10683) is two stacks, an encoder that reads the
input bidirectionally and a decoder that writes the output causally while attending to the
encoder's states (cross-attention). It gets its own file rather than branches inside GPT, as
BERT does (model/bert.py): it has no absolute or rotary positions but a learned scalar bias per
head added to the attention logits, looked up by the *bucketed* distance between query and key
(exact for small distances, logarithmic up to `max_distance`, bidirectional in the encoder,
causal in the decoder); only the first layer of each stack holds that table and every layer of
the stack reuses its bias. Norms are pre-LN RMS (T5LayerNorm: no mean, no bias), linear layers
have no bias, and attention logits are not scaled by 1/sqrt(d_kv) (T5 folds it into the init).

Feed-forward: T5 v1.1's gated GELU (wi_0, wi_1, wo; tanh GELU) or the original ReLU (wi, wo).
Embeddings: the original ties the output head to the input embedding and scales the decoder
output by dim^-0.5 first; v1.1 unties them and does not scale.

HF names: `T5ForConditionalGeneration` (`shared`, `encoder.block.N.layer.M.*`,
`decoder.block.N.layer.M.*`, `lm_head`). Layer M is 0 self-attention, then (decoder) 1
cross-attention, then the feed-forward.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import ConfigError

# the feed_forward_proj values we compute; transformers' "gated-gelu" means gelu_new (the tanh
# approximation), while its plain "gelu" would be the exact erf form, which we do not offer
FEED_FORWARDS = ("gated-gelu", "relu", "gated-relu")
ACTS = {"gelu": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


@dataclass
class T5Config:
    vocab_size: int = 32128
    dim: int = 512  # d_model
    d_kv: int = 64  # per-head width (n_head * d_kv need not equal dim)
    ffn_dim: int = 2048  # d_ff
    n_layer: int = 6  # encoder layers
    n_decoder_layer: int = 6
    n_head: int = 8
    num_buckets: int = 32  # relative_attention_num_buckets
    max_distance: int = 128  # relative_attention_max_distance
    norm_eps: float = 1e-6
    feed_forward: str = "gated-gelu"  # v1.1; "relu" is the original T5
    tie_embeddings: bool = False  # v1.1 unties; tied also scales the decoder output by dim^-0.5
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0  # T5 starts decoding from the padding id

    def __post_init__(self):
        if self.feed_forward not in FEED_FORWARDS:
            raise ConfigError(
                f"feed_forward_proj {self.feed_forward!r} is not supported: use {list(FEED_FORWARDS)}"
            )
        for name in (
            "vocab_size",
            "dim",
            "d_kv",
            "ffn_dim",
            "n_layer",
            "n_decoder_layer",
            "n_head",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"t5 {name} must be positive, got {getattr(self, name)}")

    @property
    def gated(self) -> bool:
        return self.feed_forward.startswith("gated-")

    @property
    def act(self):
        return ACTS[self.feed_forward.removeprefix("gated-")]


def relative_bucket(rel: torch.Tensor, bidirectional: bool, n_buckets: int, max_distance: int):
    """Key position minus query position -> bucket id: half the buckets exact (small
    distances), the rest logarithmic up to max_distance; the encoder splits the buckets
    between keys before and after the query, the decoder (causal) sees only keys before."""
    bucket = torch.zeros_like(rel)
    if bidirectional:
        n_buckets //= 2
        bucket = (rel > 0).long() * n_buckets
        dist = rel.abs()
    else:
        dist = (-rel).clamp(min=0)
    exact = n_buckets // 2
    # log(0) is -inf for dist 0, but those positions take the exact branch below
    log_ratio = torch.log(dist.float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (n_buckets - exact)).long()).clamp(max=n_buckets - 1)
    return bucket + torch.where(dist < exact, dist, far)


class RMSNorm(nn.Module):
    """T5LayerNorm: scale by the root mean square (computed in fp32); no mean, no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps)).to(self.weight.dtype)


class Attention(nn.Module):
    """Multi-head attention with unscaled logits plus an additive bias (position + mask)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.n_head, self.d_kv = cfg.n_head, cfg.d_kv
        inner = cfg.n_head * cfg.d_kv
        self.q = nn.Linear(cfg.dim, inner, bias=False)
        self.k = nn.Linear(cfg.dim, inner, bias=False)
        self.v = nn.Linear(cfg.dim, inner, bias=False)
        self.o = nn.Linear(inner, cfg.dim, bias=False)

    def heads(self, x):  # (B, T, H*D) -> (B, H, T, D)
        return x.view(*x.shape[:2], self.n_head, self.d_kv).transpose(1, 2)

    def kv(self, x):
        return self.heads(self.k(x)), self.heads(self.v(x))

    def forward(self, x, k, v, bias):
        """x (B, T, dim) queries; k, v (B, H, S, D); bias broadcastable to (B, H, T, S)."""
        q = self.heads(self.q(x))
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if bias is None else bias.to(q.dtype), scale=1.0
        )
        return self.o(y.transpose(1, 2).reshape(*x.shape[:2], -1))


class FeedForward(nn.Module):
    """Gated (wi_0 activated times wi_1, then wo) or plain (wi activated, then wo)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.act = cfg.act
        if cfg.gated:
            self.wi_0 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
            self.wi_1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        else:
            self.wi = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.wo = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        if hasattr(self, "wi"):
            return self.wo(self.act(self.wi(x)))
        return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))


class Block(nn.Module):
    """Pre-RMSNorm residual sublayers: self-attention, (decoder) cross-attention, feed-forward."""

    def __init__(self, cfg: T5Config, cross: bool):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(cfg.dim, cfg.norm_eps), Attention(cfg)
        if cross:
            self.cross_norm, self.cross = RMSNorm(cfg.dim, cfg.norm_eps), Attention(cfg)
        self.ff_norm, self.ff = RMSNorm(cfg.dim, cfg.norm_eps), FeedForward(cfg)

    def forward(self, x, bias, cache=None, cross_kv=None, cross_bias=None):
        """cache: this layer's dict of self-attention "k", "v" so far (grown in place)."""
        h = self.attn_norm(x)
        k, v = self.attn.kv(h)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        x = x + self.attn(h, k, v, bias)
        if cross_kv is not None:
            x = x + self.cross(self.cross_norm(x), *cross_kv, cross_bias)
        return x + self.ff(self.ff_norm(x))


def padding_bias(mask: torch.Tensor | None, dtype=torch.float32) -> torch.Tensor | None:
    """(B, S) 1 = token, 0 = padding -> (B, 1, 1, S) additive bias hiding the padding keys."""
    if mask is None:
        return None
    return (
        torch.zeros(mask.shape, dtype=dtype)
        .masked_fill(~mask.bool(), torch.finfo(dtype).min)[:, None, None, :]
        .to(mask.device)
    )


class Stack(nn.Module):
    """A T5 encoder or decoder: layers, the first layer's relative-position table, final norm."""

    def __init__(self, cfg: T5Config, decoder: bool):
        super().__init__()
        self.cfg, self.decoder = cfg, decoder
        n = cfg.n_decoder_layer if decoder else cfg.n_layer
        self.layers = nn.ModuleList(Block(cfg, cross=decoder) for _ in range(n))
        self.rel_bias = nn.Embedding(cfg.num_buckets, cfg.n_head)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def position_bias(self, q_len: int, k_len: int, past: int = 0) -> torch.Tensor:
        """(1, H, q_len, k_len): the learned bias of each query-key distance; queries sit at
        positions past..past+q_len-1 (the decoder's cache holds `past` earlier ones)."""
        dev = self.rel_bias.weight.device
        q_pos = torch.arange(past, past + q_len, device=dev)[:, None]
        rel = torch.arange(k_len, device=dev)[None, :] - q_pos
        buckets = relative_bucket(
            rel, not self.decoder, self.cfg.num_buckets, self.cfg.max_distance
        )
        return self.rel_bias(buckets).permute(2, 0, 1)[None]

    def forward(self, x, self_mask, caches=None, cross_kvs=None, cross_bias=None):
        """x (B, T, dim) embeddings -> normed hidden states. self_mask: the additive bias
        (padding, causal) of the self-attention; caches: one dict per layer (decoder)."""
        past = caches[0]["k"].shape[2] if caches and "k" in caches[0] else 0
        T = x.shape[1]
        bias = self.position_bias(T, past + T, past)
        bias = bias if self_mask is None else bias + self_mask
        for i, layer in enumerate(self.layers):
            x = layer(
                x,
                bias,
                cache=None if caches is None else caches[i],
                cross_kv=None if cross_kvs is None else cross_kvs[i],
                cross_bias=cross_bias,
            )
        return self.norm(x)


class T5(nn.Module):
    """Encoder-decoder with an LM head: `forward(idx, dec_idx)` -> logits (B, T_dec, V)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)  # shared by both stacks
        self.encoder = Stack(cfg, decoder=False)
        self.decoder = Stack(cfg, decoder=True)
        self.lm_head = (
            None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        )
        self.apply(self._init)

    def _init(self, m):
        """T5's init (Mesh TensorFlow's): std 1/sqrt(fan_in), and the query's also divided by
        sqrt(d_kv), the attention scaling that the logits then omit."""
        cfg = self.cfg
        if isinstance(m, Attention):
            nn.init.normal_(m.q.weight, std=(cfg.dim * cfg.d_kv) ** -0.5)
            for w in (m.k.weight, m.v.weight):
                nn.init.normal_(w, std=cfg.dim**-0.5)
            nn.init.normal_(m.o.weight, std=(cfg.n_head * cfg.d_kv) ** -0.5)
        elif isinstance(m, FeedForward):
            for name in ("wi", "wi_0", "wi_1"):
                if hasattr(m, name):
                    nn.init.normal_(getattr(m, name).weight, std=cfg.dim**-0.5)
            nn.init.normal_(m.wo.weight, std=cfg.ffn_dim**-0.5)
        elif isinstance(m, Stack):
            nn.init.normal_(m.rel_bias.weight, std=cfg.dim**-0.5)
        elif m is self:
            nn.init.normal_(self.tok_emb.weight, std=1.0)
            if self.lm_head is not None:
                nn.init.normal_(self.lm_head.weight, std=1.0)

    def encode(self, idx, attention_mask=None):
        """idx (B, S) -> encoder states (B, S, dim); attention_mask (B, S) 1 = token, 0 = pad."""
        return self.encoder(self.tok_emb(idx), padding_bias(attention_mask))

    def cross_kvs(self, enc):
        """Each decoder layer's cross-attention keys and values: computed once per input."""
        return [layer.cross.kv(enc) for layer in self.decoder.layers]

    def decode(self, dec_idx, cross_kvs, attention_mask=None, caches=None):
        """Decoder logits (B, T, V) for dec_idx (B, T) given the cross K/V of the encoder
        states; with caches (one dict per layer), dec_idx are only the new tokens."""
        T = dec_idx.shape[1]
        past = caches[0]["k"].shape[2] if caches and "k" in caches[0] else 0
        causal = torch.ones(T, past + T, dtype=torch.bool, device=dec_idx.device).tril(past)
        self_mask = torch.zeros(causal.shape, device=dec_idx.device).masked_fill(
            ~causal, torch.finfo(torch.float32).min
        )
        h = self.decoder(
            self.tok_emb(dec_idx), self_mask, caches, cross_kvs, padding_bias(attention_mask)
        )
        return self.logits(h)

    def logits(self, h):
        if self.lm_head is None:  # tied: the original T5 rescales before the shared matrix
            return F.linear(h * self.cfg.dim**-0.5, self.tok_emb.weight)
        return self.lm_head(h)

    def forward(self, idx, dec_idx, attention_mask=None):
        enc = self.encode(idx, attention_mask)
        return self.decode(dec_idx, self.cross_kvs(enc), attention_mask)

    @torch.no_grad()
    def generate_greedy(self, idx, max_new_tokens: int, attention_mask=None, use_cache=True):
        """Greedy decoding -> (B, n) new tokens (no start token). The encoder runs once; with
        use_cache the decoder feeds only the newest token against its self-attention K/V cache,
        else it recomputes the whole prefix each step. A row that wrote EOS is padded after."""
        cfg = self.cfg
        kvs = self.cross_kvs(self.encode(idx, attention_mask))
        B = idx.shape[0]
        seq = torch.full((B, 1), cfg.decoder_start_token_id, dtype=torch.long, device=idx.device)
        caches = [{} for _ in self.decoder.layers] if use_cache else None
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            step = seq[:, -1:] if use_cache else seq
            nxt = self.decode(step, kvs, attention_mask, caches)[:, -1].argmax(-1)
            nxt = nxt.masked_fill(done, cfg.pad_token_id)
            seq = torch.cat([seq, nxt[:, None]], 1)
            done |= nxt == cfg.eos_token_id
            if done.all():
                break
        return seq[:, 1:]


# --- Hugging Face interop

# our T5Config field -> transformers' T5Config field
HF_FIELDS = {
    "vocab_size": "vocab_size",
    "dim": "d_model",
    "d_kv": "d_kv",
    "ffn_dim": "d_ff",
    "n_layer": "num_layers",
    "n_decoder_layer": "num_decoder_layers",
    "n_head": "num_heads",
    "num_buckets": "relative_attention_num_buckets",
    "max_distance": "relative_attention_max_distance",
    "norm_eps": "layer_norm_epsilon",
    "feed_forward": "feed_forward_proj",
    "tie_embeddings": "tie_word_embeddings",
    "pad_token_id": "pad_token_id",
    "eos_token_id": "eos_token_id",
    "decoder_start_token_id": "decoder_start_token_id",
}


def is_t5_config(hf: dict) -> bool:
    return hf.get("model_type") == "t5"


def from_hf_config(hf: dict) -> T5Config:
    """transformers' T5 config.json -> T5Config (its defaults where a key is absent)."""
    if not is_t5_config(hf):
        raise ConfigError(f"model_type {hf.get('model_type')!r} is not 't5'")
    d = T5Config.__dataclass_fields__
    kw = {ours: hf.get(theirs) for ours, theirs in HF_FIELDS.items()}
    kw = {k: v for k, v in kw.items() if v is not None}
    kw.setdefault("feed_forward", "relu")  # transformers' default is the original T5
    kw.setdefault("tie_embeddings", True)
    kw.setdefault("n_decoder_layer", kw.get("n_layer", d["n_layer"].default))
    if isinstance(kw.get("eos_token_id"), list):
        kw["eos_token_id"] = kw["eos_token_id"][0]
    return T5Config(**kw)


def to_hf_config(cfg: T5Config) -> dict:
    """T5Config -> a config.json transformers opens as T5ForConditionalGeneration."""
    hf = {theirs: getattr(cfg, ours) for ours, theirs in HF_FIELDS.items()}
    hf.update(
        model_type="t5",
        architectures=["T5ForConditionalGeneration"],
        is_encoder_decoder=True,
        dropout_rate=0.0,  # we train without dropout
    )
    return hf


def name_map(cfg: T5Config) -> dict[str, str]:
    """Our tensor name -> T5ForConditionalGeneration's."""
    out = {"tok_emb.weight": "shared.weight"}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = "lm_head.weight"
    for stack, n in (("encoder", cfg.n_layer), ("decoder", cfg.n_decoder_layer)):
        out[f"{stack}.rel_bias.weight"] = (
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        )
        out[f"{stack}.norm.weight"] = f"{stack}.final_layer_norm.weight"
        subs = [("attn", "SelfAttention")] + (
            [("cross", "EncDecAttention")] if stack == "decoder" else []
        )
        subs.append(("ff", "DenseReluDense"))
        ffs = ("wi_0", "wi_1", "wo") if cfg.gated else ("wi", "wo")
        for i in range(n):
            for j, (ours, theirs) in enumerate(subs):
                p, q = f"{stack}.layers.{i}.", f"{stack}.block.{i}.layer.{j}."
                out[f"{p}{ours}_norm.weight"] = f"{q}layer_norm.weight"
                for w in ffs if ours == "ff" else ("q", "k", "v", "o"):
                    out[f"{p}{ours}.{w}.weight"] = f"{q}{theirs}.{w}.weight"
    return out


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: T5Config) -> dict[str, torch.Tensor]:
    """T5ForConditionalGeneration (or T5Model) tensors -> ours. A tied checkpoint's lm_head
    is the shared embedding; an untied one without lm_head.weight is refused by name."""
    out = {}
    for ours, theirs in name_map(cfg).items():
        if theirs not in hf:
            raise ConfigError(f"T5 checkpoint has no tensor {theirs}")
        out[ours] = hf[theirs]
    return out


def to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: T5Config) -> dict[str, torch.Tensor]:
    """Our tensors -> T5ForConditionalGeneration's names (`shared` only: transformers ties the
    stacks' embed_tokens, and a tied model's lm_head, to it on load)."""
    return {theirs: sd[ours] for ours, theirs in name_map(cfg).items()}


def load_t5(path: str | Path, device: str | torch.device = "cpu") -> T5:
    """A T5 Hugging Face directory (config.json + model.safetensors) -> T5 in eval mode,
    gradients off."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, weights = path / "config.json", path / "model.safetensors"
    for f in (cfg_file, weights):
        if not f.is_file():
            raise ConfigError(f"{path} is not a T5 directory: {f.name} is missing")
    try:
        hf_cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{cfg_file} is not valid JSON: {e}") from None
    cfg = from_hf_config(hf_cfg)
    model = T5(cfg)
    try:
        model.load_state_dict(from_hf_state_dict(load_file(str(weights)), cfg))
    except RuntimeError as e:  # shapes that disagree with config.json
        msg = str(e).splitlines()[-1].strip()
        raise ConfigError(f"{weights} does not fit {cfg_file.name}: {msg}") from None
    return model.to(device).eval().requires_grad_(False)


def save_t5(model: T5, path: str | Path) -> None:
    """Write config.json + model.safetensors that transformers' T5ForConditionalGeneration opens."""
    from safetensors.torch import save_file

    from lmforge.io import write_json

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf = to_hf_state_dict(model.state_dict(), model.cfg)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in hf.items()}, str(path / "model.safetensors")
    )
    write_json(path / "config.json", to_hf_config(model.cfg))
