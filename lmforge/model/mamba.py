"""Mamba: a selective state-space language model (Gu & Dao, arXiv:2312.00752), in plain PyTorch.

The one idea: each block replaces attention and the MLP by a recurrence. Per channel e and
state dimension n, h_t = exp(dt_t * A) h_{t-1} + dt_t * B_t * x_t and y_t = C_t . h_t + D x_t,
where dt, B and C are computed from the input (the "selective" part: the model chooses per token
what to keep and what to forget). Decoding therefore carries a fixed-size state per layer (the
last conv_kernel - 1 inputs of the causal convolution and h, (B, d_inner, d_state)) instead of a
KV cache that grows with the context.

Training and prefill run `selective_scan`, a chunked scan: the sequence is cut into chunks of
`chunk` (32) steps; within a chunk the discretised (B, chunk, d_inner, d_state) tensors are built
and the recurrence is solved in log space with two cumulative sums (`_scan_chunk`: no loop over
steps, float64 so the growing exp(-cumulative decay) cannot overflow), and only the state crosses
to the next chunk. Under autograd each chunk is activation-checkpointed, so backward keeps one
state per chunk, not one per token: memory is linear in length with a small constant, never
(B, T, d_inner, d_state) at once. transformers' slow path loops over every step; the two agree
to float rounding (the tests: 1e-4 on logits).

The math is transformers' `MambaMixer` slow path: in_proj -> (x, z); depthwise causal conv1d and
SiLU on x; x_proj -> (dt, B, C); dt_proj then softplus; the scan with A = -exp(A_log) and the D
skip; y * silu(z); out_proj. Blocks are pre-norm residual (RMSNorm -> mixer), then a final
RMSNorm and the output head (tied to the embeddings by default), as `MambaForCausalLM`.
Parameter names inside a mixer are transformers' own, so the state dict maps by prefix only:
`layers.{i}.*` <-> `backbone.layers.{i}.*`, `tok_emb` <-> `backbone.embeddings`, `norm` <->
`backbone.norm_f`.

The model answers the calls generation makes of a GPT (`forward(idx, cache, pos, last_only)`,
`new_cache`, `cfg.max_seq_len`, `device`), so `infer/generate.py` decodes it unchanged.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lmforge.config import ConfigError
from lmforge.model.transformer import RMSNorm

CHUNK = 32  # scan steps materialised at once: (B, CHUNK, d_inner, d_state) floats
# A step's log-decay dt * A is clamped at -MAX_DECAY: exp(-20) = 2e-9 of the old state survives
# instead of less, an error far below float32's rounding of the state. It bounds the chunk's
# cumulative log-decay by CHUNK * MAX_DECAY = 640, inside float64's exp range (709).
MAX_DECAY = 20.0


@dataclass
class MambaConfig:
    vocab_size: int = 256
    dim: int = 64  # hidden_size
    n_layer: int = 2  # num_hidden_layers
    d_state: int = 16  # state_size: the state's width per channel
    expand: int = 2  # d_inner = expand * dim
    conv_kernel: int = 4  # the causal depthwise convolution's width
    dt_rank: int = 0  # time_step_rank: the rank of dt's projection; 0 = ceil(dim / 16)
    norm_eps: float = 1e-5  # layer_norm_epsilon
    use_bias: bool = False  # in_proj and out_proj have biases
    use_conv_bias: bool = True
    tie_embeddings: bool = True
    init_std: float = 0.02  # initializer_range
    # no position table: the only limit on a context is what generation is told; training
    # uses pretrain.seq_len
    max_seq_len: int = 1 << 20
    bos_token_id: int = 0
    eos_token_id: int = 0
    pad_token_id: int = 0

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layer", "d_state", "expand", "conv_kernel"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"mamba config: {name} must be a positive integer, got {v!r}")
        if self.dt_rank < 0:
            raise ConfigError(f"mamba config: dt_rank must be >= 0 (0 = auto), got {self.dt_rank}")
        self.dt_rank = self.dt_rank or math.ceil(self.dim / 16)
        if not self.norm_eps > 0:
            raise ConfigError(f"mamba config: norm_eps must be positive, got {self.norm_eps}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.dim


class MambaCache:
    """The recurrent state of every layer: conv[i] (B, d_inner, conv_kernel - 1), the last inputs
    of the causal convolution, and ssm[i] (B, d_inner, d_state). Its size does not depend on the
    context length (the KVCache's counterpart; zeros = nothing seen yet)."""

    def __init__(self, cfg: MambaConfig, batch_size: int, device=None, dtype=None):
        conv = (batch_size, cfg.d_inner, cfg.conv_kernel - 1)
        ssm = (batch_size, cfg.d_inner, cfg.d_state)
        self.conv = [torch.zeros(conv, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        # the scan accumulates in float32 whatever the weights' dtype
        self.ssm = [torch.zeros(ssm, device=device) for _ in range(cfg.n_layer)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.conv, *self.ssm))


def _scan_chunk(x, dt, A, B, C, h):
    """One chunk of the recurrence h_t = a_t h_{t-1} + b_t in closed form: with S_t the running
    sum of log a, h_t = exp(S_t) (h_0 + sum_{s<=t} exp(-S_s) b_s), two cumulative sums instead
    of a loop over steps. In float64: exp(-S) grows as the state decays (to exp(640) at most,
    MAX_DECAY), and each term is at most the newest one, so no precision is lost in the sum.
    x, dt (b, L, E); A (E, N); B, C (b, L, N); h (b, E, N) the state before the chunk ->
    (y (b, L, E) without the D skip, h after the chunk)."""
    log_a = (dt[..., None] * A).clamp(min=-MAX_DECAY)  # (b, L, E, N): log of each step's decay
    S = log_a.double().cumsum(dim=1)
    b = (dt * x)[..., None] * B[:, :, None, :]  # (b, L, E, N): what each step writes
    hs = S.exp() * (h.double()[:, None] + (b.double() * (-S).exp()).cumsum(dim=1))
    hs = hs.to(x.dtype)  # (b, L, E, N): the state after every step of the chunk
    return (hs @ C[..., None])[..., 0], hs[:, -1]  # read each state through its C_t


def selective_scan(x, dt, A, B, C, D, h, chunk: int = CHUNK):
    """The selective scan over (b, T) in chunks of `chunk` steps (module docstring), from state h
    (b, E, N). Returns y (b, T, E) with the D skip, and the state after the last step."""
    assert chunk * MAX_DECAY < 700, f"scan chunk {chunk} would overflow float64's exp"
    ys = []
    for s in range(0, x.shape[1], chunk):
        part = (x[:, s : s + chunk], dt[:, s : s + chunk], A, B[:, s : s + chunk])
        part += (C[:, s : s + chunk], h)
        if torch.is_grad_enabled() and x.requires_grad:  # keep h per chunk, recompute the rest
            y, h = checkpoint(_scan_chunk, *part, use_reentrant=False)
        else:
            y, h = _scan_chunk(*part)
        ys.append(y)
    return torch.cat(ys, dim=1) + x * D, h


class MambaMixer(nn.Module):
    """The selective SSM layer (transformers' MambaMixer, its parameter names included)."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        E, N, R = cfg.d_inner, cfg.d_state, cfg.dt_rank
        self.in_proj = nn.Linear(cfg.dim, 2 * E, bias=cfg.use_bias)
        self.conv1d = nn.Conv1d(E, E, cfg.conv_kernel, groups=E, bias=cfg.use_conv_bias)
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=True)
        self.A_log = nn.Parameter(torch.empty(E, N))
        self.D = nn.Parameter(torch.empty(E))
        self.out_proj = nn.Linear(E, cfg.dim, bias=cfg.use_bias)
        self.split = (R, N, N)

    def forward(self, x, cache: MambaCache | None = None, layer: int = 0):
        b, T, _ = x.shape
        u, z = self.in_proj(x).chunk(2, dim=-1)  # (b, T, E) each
        u = u.transpose(1, 2)  # (b, E, T): channels first for the convolution
        K1 = self.conv1d.kernel_size[0] - 1
        past = cache.conv[layer] if cache is not None else u.new_zeros(b, u.shape[1], K1)
        u = torch.cat([past, u], dim=-1)  # (b, E, K1 + T): the causal left context
        if cache is not None:
            cache.conv[layer].copy_(u[..., u.shape[-1] - K1 :])
        u = F.silu(F.conv1d(u, self.conv1d.weight, self.conv1d.bias, groups=u.shape[1]))
        u = u.transpose(1, 2)  # (b, T, E)
        dt, B, C = self.x_proj(u).split(self.split, dim=-1)
        dt = F.softplus(self.dt_proj(dt))  # (b, T, E): each channel's step size, > 0
        A = -torch.exp(self.A_log.float())  # (E, N) < 0: the state decays
        h = cache.ssm[layer] if cache is not None else u.new_zeros(b, *A.shape)
        y, h = selective_scan(u, dt, A, B, C, self.D, h)
        if cache is not None:
            cache.ssm[layer].copy_(h)
        return self.out_proj(y * F.silu(z))

    def step(self, x, cache: MambaCache, layer: int):
        """One token x (b, dim) after the cache's state: forward's math for T = 1 written as the
        recurrence itself (a dot product for the convolution, h updated in place), without the
        scan's chunking, which costs more than the arithmetic of one token."""
        u, z = self.in_proj(x).chunk(2, dim=-1)  # (b, E) each
        conv = cache.conv[layer]  # (b, E, K - 1)
        window = torch.cat([conv, u[..., None]], dim=-1)  # (b, E, K)
        conv.copy_(window[..., 1:])
        u = (window * self.conv1d.weight[:, 0]).sum(-1)
        if self.conv1d.bias is not None:
            u = u + self.conv1d.bias
        u = F.silu(u)
        dt, B, C = self.x_proj(u).split(self.split, dim=-1)
        dt = F.softplus(self.dt_proj(dt))  # (b, E)
        h = cache.ssm[layer]  # (b, E, N)
        h.mul_(torch.exp(dt[..., None] * -torch.exp(self.A_log.float())))
        h.add_((dt * u)[..., None] * B[:, None, :])
        y = (h @ C[..., None])[..., 0] + u * self.D
        return self.out_proj(y * F.silu(z))


class MambaBlock(nn.Module):
    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mixer = MambaMixer(cfg)

    def forward(self, x, cache=None, layer=0):
        return x + self.mixer(self.norm(x), cache, layer)


class Mamba(nn.Module):
    """A Mamba language model: embeddings, n_layer blocks, final RMSNorm, output head."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(MambaBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1):
        """transformers' Mamba initialisation, with our init_std: S4D-real A (A_log = log 1..N),
        D = 1, dt's bias the inverse softplus of a step drawn log-uniform in [dt_min, dt_max]
        (so every channel starts with its own memory length); out_proj scaled by
        1/sqrt(n_layer) (the residual sum keeps unit-order variance)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            elif name.endswith("weight") and "conv1d" not in name:
                nn.init.normal_(p, 0.0, std)
        for layer in self.layers:
            m = layer.mixer
            E, N = m.A_log.shape
            m.A_log.copy_(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).expand(E, N))
            m.D.fill_(1.0)
            nn.init.kaiming_uniform_(m.conv1d.weight, a=math.sqrt(5))
            r = self.cfg.dt_rank**-0.5
            nn.init.uniform_(m.dt_proj.weight, -r, r)
            dt = torch.exp(torch.rand(E) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=1e-4)
            m.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
            m.out_proj.weight.div_(math.sqrt(self.cfg.n_layer))

    def forward(
        self,
        idx: torch.Tensor,
        cache: MambaCache | None = None,
        pos: int = 0,
        last_only: bool = False,
    ):
        """idx (B, T) -> logits (B, T, V), or (B, 1, V) if last_only. With a cache, the tokens
        continue what it has seen and the cache moves past them; `pos` is accepted for GPT's
        call shape (a state-space model has no positions to index)."""
        x = self.features(idx, cache)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(x)

    def features(self, idx: torch.Tensor, cache: MambaCache | None = None):
        """The final normed hidden states (B, T, dim)."""
        x = self.tok_emb(idx)  # (B, T, dim)
        if cache is not None and idx.shape[1] == 1:  # decoding: the one-token recurrence
            x = x[:, 0]
            for i, block in enumerate(self.layers):
                x = x + block.mixer.step(block.norm(x), cache, i)
            return self.norm(x)[:, None]
        for i, block in enumerate(self.layers):
            x = block(x, cache, i)
        return self.norm(x)

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def new_cache(self, batch_size: int, max_len: int | None = None) -> MambaCache:
        """A fresh recurrent state; max_len is accepted for KVCache's call shape and ignored:
        the state's size does not grow with the context."""
        return MambaCache(self.cfg, batch_size, self.device, self.norm.weight.dtype)


def flops_per_token(cfg: MambaConfig) -> float:
    """Training FLOPs per token (6 x the matmul parameters, as for a GPT; the scan's own
    ~9 * d_inner * d_state per token forward is added, times 3 for backward)."""
    E, N, R = cfg.d_inner, cfg.d_state, cfg.dt_rank
    per_layer = cfg.dim * 2 * E + E * (R + 2 * N) + R * E + E * cfg.dim + E * cfg.conv_kernel
    matmul = cfg.n_layer * per_layer + cfg.dim * cfg.vocab_size
    return 6 * matmul + 3 * cfg.n_layer * 9 * E * N


# --- Hugging Face interop (MambaForCausalLM)

# our MambaConfig field -> transformers' MambaConfig field
HF_FIELDS = {
    "vocab_size": "vocab_size",
    "dim": "hidden_size",
    "n_layer": "num_hidden_layers",
    "d_state": "state_size",
    "expand": "expand",
    "conv_kernel": "conv_kernel",
    "dt_rank": "time_step_rank",
    "norm_eps": "layer_norm_epsilon",
    "use_bias": "use_bias",
    "use_conv_bias": "use_conv_bias",
    "tie_embeddings": "tie_word_embeddings",
    "init_std": "initializer_range",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
}
TOP_NAMES = {
    "tok_emb.weight": "backbone.embeddings.weight",
    "norm.weight": "backbone.norm_f.weight",
}


def is_mamba_config(hf: dict) -> bool:
    return hf.get("model_type") == "mamba"


def from_hf_config(hf: dict) -> MambaConfig:
    """transformers' Mamba config.json -> MambaConfig; options that change the math are refused
    by name."""
    if not is_mamba_config(hf):
        raise ConfigError(f"model_type {hf.get('model_type')!r} is not 'mamba'")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config.json: hidden_act={hf['hidden_act']!r} is not supported (silu)")
    if hf.get("quantization_config"):
        raise ConfigError("config.json: a quantized Mamba checkpoint is not supported")
    defaults = MambaConfig()
    kw = {ours: hf.get(theirs, getattr(defaults, ours)) for ours, theirs in HF_FIELDS.items()}
    if kw["dt_rank"] == "auto":
        kw["dt_rank"] = 0
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = kw[k]
        kw[k] = (v[0] if v else 0) if isinstance(v, list) else (v or 0)
    kw["tie_embeddings"] = bool(kw["tie_embeddings"])
    if hf.get("max_seq_len"):  # lmforge's own key (transformers keeps unknown keys)
        kw["max_seq_len"] = hf["max_seq_len"]
    return MambaConfig(**kw)


def to_hf_config(cfg: MambaConfig) -> dict:
    """MambaConfig -> a config.json transformers opens as MambaForCausalLM."""
    hf = {theirs: getattr(cfg, ours) for ours, theirs in HF_FIELDS.items()}
    hf.update(model_type="mamba", architectures=["MambaForCausalLM"], hidden_act="silu")
    hf.update(intermediate_size=cfg.d_inner, residual_in_fp32=True, torch_dtype="float32")
    hf["max_seq_len"] = cfg.max_seq_len
    return hf


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: MambaConfig) -> dict[str, torch.Tensor]:
    """MambaForCausalLM (or MambaModel) tensors -> ours: the same names under another prefix."""
    prefix = "backbone." if "backbone.embeddings.weight" in hf else ""
    sd = {ours: hf[theirs.replace("backbone.", prefix)] for ours, theirs in TOP_NAMES.items()}
    for name, t in hf.items():
        if name.startswith(f"{prefix}layers."):
            sd[name.removeprefix(prefix)] = t
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    else:
        sd["lm_head.weight"] = hf["lm_head.weight"]
    return sd


def to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: MambaConfig) -> dict[str, torch.Tensor]:
    """Our tensors -> MambaForCausalLM's names (a tied head is left out: transformers ties it)."""
    hf = {theirs: sd[ours] for ours, theirs in TOP_NAMES.items()}
    hf |= {f"backbone.{k}": v for k, v in sd.items() if k.startswith("layers.")}
    if not cfg.tie_embeddings:
        hf["lm_head.weight"] = sd["lm_head.weight"]
    return hf


def load_mamba(path: str | Path, device: str | torch.device = "cpu") -> Mamba:
    """A MambaForCausalLM directory (config.json + model.safetensors) -> Mamba in eval mode,
    gradients off; a missing tensor or a wrong shape is named."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, weights = path / "config.json", path / "model.safetensors"
    for f in (cfg_file, weights):
        if not f.is_file():
            raise ConfigError(f"{path} is not a Mamba directory: {f.name} is missing")
    try:
        cfg = from_hf_config(json.loads(cfg_file.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{cfg_file} is not valid JSON: {e}") from None
    model = Mamba(cfg)
    read_weights(model, load_file(str(weights)), weights)
    return model.to(device).eval().requires_grad_(False)


def read_weights(model: Mamba, tensors: dict, source: Path) -> None:
    """HF tensors into `model` in place, every name and shape checked against its config."""
    try:
        sd = from_hf_state_dict(tensors, model.cfg)
    except KeyError as e:
        raise ConfigError(f"{source} has no tensor {e.args[0]}") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise ConfigError(f"{source} lacks {missing[0]} (and {len(missing) - 1} more)")
    for name, t in sd.items():
        if name not in expected or t.shape != expected[name].shape:
            want = tuple(expected[name].shape) if name in expected else "no such tensor"
            raise ConfigError(
                f"{source}: {name} has shape {tuple(t.shape)}; the config implies {want}"
            )
    model.load_state_dict(sd)


def save_mamba(model: Mamba, path: str | Path) -> None:
    """config.json + model.safetensors that transformers' MambaForCausalLM opens (the caller
    adds the tokenizer files)."""
    from safetensors.torch import save_file

    from lmforge.io import write_json

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf = to_hf_state_dict(model.state_dict(), model.cfg)
    tensors = {k: v.detach().cpu().contiguous() for k, v in hf.items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    write_json(path / "config.json", to_hf_config(model.cfg))
