"""An encoder-only Transformer of the BERT family, and its Hugging Face interop.

The one idea: BERT is GPT with three things changed, so it gets its own small file rather than
branches inside GPT's forward: every token attends to every other (no causal mask; padding is
masked instead), LayerNorm comes *after* each residual add (post-LN), and the input adds a
learned position and a token-type ("segment") vector to the word embedding, then normalises.
The masked-LM head (dense + GELU + LayerNorm, then a decoder tied to the word embeddings) is
optional: sentence-embedding checkpoints such as all-MiniLM-L6-v2 ship the bare encoder.

The config is a dataclass of its own: an encoder shares few of GPT's knobs (no RoPE, no KV
heads, no SwiGLU, no chat template) and every consumer of a GPT (training stages, the engine,
quantization) would otherwise have to refuse it. A recipe's `model:` names the family with
`arch: bert` only for `lmforge pretrain`, which builds a BertConfig from it (train/mlm.py).

HF names: `BertModel` (`embeddings.*`, `encoder.layer.N.*`) and `BertForMaskedLM` (the same
under `bert.`, plus `cls.predictions.*`). q, k and v are fused on import, as in GPT. The pooler
(`pooler.dense`, a tanh layer for next-sentence prediction) is not computed: it is dropped on
import, and transformers initialises it afresh when it opens an exported encoder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import ConfigError

ACTIVATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}  # F.gelu's
# `approximate`: BERT's "gelu" is the exact erf form


@dataclass
class BertConfig:
    vocab_size: int = 30522
    dim: int = 384
    n_layer: int = 6
    n_head: int = 12
    ffn_dim: int = 1536
    max_seq_len: int = 512  # learned positions: the longest input
    type_vocab_size: int = 2  # token types (segments A and B)
    norm_eps: float = 1e-12
    act: str = "gelu"  # gelu (exact), gelu_new / gelu_pytorch_tanh (tanh approximation)
    pad_token_id: int = 0
    init_std: float = 0.02

    def __post_init__(self):
        if self.dim % self.n_head:
            raise ConfigError(f"dim {self.dim} is not divisible by n_head {self.n_head}")
        if self.act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act {self.act!r} is not supported: use {list(ACTIVATIONS)}")


class BertLayer(nn.Module):
    """Bidirectional attention and a GELU MLP, each followed by residual add and LayerNorm."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.approximate = ACTIVATIONS[cfg.act]
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.attn_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.fc = nn.Linear(cfg.dim, cfg.ffn_dim)
        self.fc_out = nn.Linear(cfg.ffn_dim, cfg.dim)
        self.mlp_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, x, mask):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # mask (B, 1, 1, T)
        x = self.attn_norm(x + self.proj(y.transpose(1, 2).reshape(B, T, C)))  # post-LN
        h = F.gelu(self.fc(x), approximate=self.approximate)
        return self.mlp_norm(x + self.fc_out(h))


class Bert(nn.Module):
    """BERT encoder; `forward` gives the last hidden states, `mlm_logits` the masked-LM head's."""

    def __init__(self, cfg: BertConfig, mlm_head: bool = False):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim, padding_idx=cfg.pad_token_id)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.dim)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.dim)
        self.emb_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.n_layer))
        self.head = None
        if mlm_head:  # the decoder's weight is tok_emb's (tied), only its bias is its own
            self.head = nn.ModuleDict(
                {
                    "dense": nn.Linear(cfg.dim, cfg.dim),
                    "norm": nn.LayerNorm(cfg.dim, eps=cfg.norm_eps),
                }
            )
            self.head_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.apply(self._init)

    def _init(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.cfg.init_std)
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)

    def forward(self, idx, attention_mask=None, token_type_ids=None):
        """idx (B, T) -> hidden states (B, T, dim). attention_mask (B, T): 1 for tokens, 0 for
        padding (which no token attends to); token_type_ids (B, T): default all segment 0."""
        B, T = idx.shape
        assert T <= self.cfg.max_seq_len, (
            f"input of {T} tokens exceeds the encoder's {self.cfg.max_seq_len} positions"
        )
        types = torch.zeros_like(idx) if token_type_ids is None else token_type_ids
        x = self.tok_emb(idx) + self.pos_emb.weight[:T] + self.type_emb(types)
        x = self.emb_norm(x)  # (B, T, dim)
        mask = None
        if attention_mask is not None:
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): keys to attend
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def mlm_logits(self, hidden):
        """Hidden states (B, T, dim) -> vocabulary logits (B, T, V) through the MLM head."""
        assert self.head is not None, "this encoder was built without its masked-LM head"
        h = F.gelu(self.head["dense"](hidden), approximate=ACTIVATIONS[self.cfg.act])
        return F.linear(self.head["norm"](h), self.tok_emb.weight, self.head_bias)


# --- Hugging Face interop

# our BertConfig field -> transformers' BertConfig field
HF_FIELDS = {
    "vocab_size": "vocab_size",
    "dim": "hidden_size",
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "ffn_dim": "intermediate_size",
    "max_seq_len": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
    "norm_eps": "layer_norm_eps",
    "act": "hidden_act",
    "pad_token_id": "pad_token_id",
    "init_std": "initializer_range",
}
HF_REFUSED = {  # options that change the math, accepted only at the value we compute
    "position_embedding_type": "absolute",
    "is_decoder": False,
    "add_cross_attention": False,
}
# our tensor name (in a layer) -> BertModel's, under encoder.layer.N.
LAYER_NAMES = {
    "proj": "attention.output.dense",
    "attn_norm": "attention.output.LayerNorm",
    "fc": "intermediate.dense",
    "fc_out": "output.dense",
    "mlp_norm": "output.LayerNorm",
}
TOP_NAMES = {
    "tok_emb.weight": "embeddings.word_embeddings.weight",
    "pos_emb.weight": "embeddings.position_embeddings.weight",
    "type_emb.weight": "embeddings.token_type_embeddings.weight",
    "emb_norm.weight": "embeddings.LayerNorm.weight",
    "emb_norm.bias": "embeddings.LayerNorm.bias",
}
HEAD_NAMES = {
    "head.dense.weight": "cls.predictions.transform.dense.weight",
    "head.dense.bias": "cls.predictions.transform.dense.bias",
    "head.norm.weight": "cls.predictions.transform.LayerNorm.weight",
    "head.norm.bias": "cls.predictions.transform.LayerNorm.bias",
    "head_bias": "cls.predictions.bias",
}


def is_bert_config(hf: dict) -> bool:
    return hf.get("model_type") == "bert"


def from_hf_config(hf: dict) -> BertConfig:
    """transformers' BERT config.json -> BertConfig; math-changing options are refused by name."""
    if not is_bert_config(hf):
        raise ConfigError(f"model_type {hf.get('model_type')!r} is not 'bert'")
    for key, ours in HF_REFUSED.items():
        if hf.get(key, ours) != ours:
            raise ConfigError(f"config.json: {key}={hf[key]!r} is not supported (only {ours!r})")
    defaults = BertConfig()
    kw = {ours: hf.get(theirs, getattr(defaults, ours)) for ours, theirs in HF_FIELDS.items()}
    kw["pad_token_id"] = kw["pad_token_id"] or 0
    return BertConfig(**kw)


def to_hf_config(cfg: BertConfig, mlm_head: bool = False) -> dict:
    """BertConfig -> a config.json transformers opens as BertModel (or BertForMaskedLM)."""
    hf = {theirs: getattr(cfg, ours) for ours, theirs in HF_FIELDS.items()}
    arch = "BertForMaskedLM" if mlm_head else "BertModel"
    hf.update(model_type="bert", architectures=[arch], position_embedding_type="absolute")
    hf.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # we train without
    return hf


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: BertConfig) -> dict[str, torch.Tensor]:
    """BertModel or BertForMaskedLM tensors -> ours (q, k, v fused; pooler and NSP dropped)."""
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in hf else ""
    sd = {ours: hf[prefix + theirs] for ours, theirs in TOP_NAMES.items()}
    for i in range(cfg.n_layer):
        p = f"{prefix}encoder.layer.{i}."
        for kind in ("weight", "bias"):
            qkv = [hf[f"{p}attention.self.{n}.{kind}"] for n in ("query", "key", "value")]
            sd[f"layers.{i}.qkv.{kind}"] = torch.cat(qkv)
            for ours, theirs in LAYER_NAMES.items():
                sd[f"layers.{i}.{ours}.{kind}"] = hf[f"{p}{theirs}.{kind}"]
    if has_mlm_head(hf):
        sd.update({ours: hf[theirs] for ours, theirs in HEAD_NAMES.items()})
    return sd


def has_mlm_head(hf: dict) -> bool:
    return "cls.predictions.transform.dense.weight" in hf


def to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: BertConfig) -> dict[str, torch.Tensor]:
    """Our tensors -> BertModel's names, or BertForMaskedLM's when the MLM head is there."""
    mlm = "head_bias" in sd
    prefix = "bert." if mlm else ""
    hf = {prefix + theirs: sd[ours] for ours, theirs in TOP_NAMES.items()}
    for i in range(cfg.n_layer):
        p = f"{prefix}encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = sd[f"layers.{i}.qkv.{kind}"].chunk(3)
            for name, t in zip(("query", "key", "value"), (q, k, v)):
                hf[f"{p}attention.self.{name}.{kind}"] = t.contiguous()
            for ours, theirs in LAYER_NAMES.items():
                hf[f"{p}{theirs}.{kind}"] = sd[f"layers.{i}.{ours}.{kind}"]
    if mlm:
        hf.update({theirs: sd[ours] for ours, theirs in HEAD_NAMES.items()})
        hf["cls.predictions.decoder.weight"] = sd["tok_emb.weight"]  # tied
        hf["cls.predictions.decoder.bias"] = sd["head_bias"]
    return hf


def load_bert(path: str | Path, device: str | torch.device = "cpu") -> Bert:
    """A BERT-family Hugging Face directory (config.json + model.safetensors) -> Bert in eval
    mode, gradients off, with the MLM head when the checkpoint has one."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, weights = path / "config.json", path / "model.safetensors"
    for f in (cfg_file, weights):
        if not f.is_file():
            raise ConfigError(f"{path} is not an encoder directory: {f.name} is missing")
    try:
        hf_cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{cfg_file} is not valid JSON: {e}") from None
    cfg = from_hf_config(hf_cfg)
    tensors = load_file(str(weights))
    model = Bert(cfg, mlm_head=has_mlm_head(tensors))
    try:
        model.load_state_dict(from_hf_state_dict(tensors, cfg))
    except KeyError as e:
        raise ConfigError(
            f"{weights} has no tensor {e.args[0]} that {cfg_file.name} implies"
        ) from None
    return model.to(device).eval().requires_grad_(False)


def save_bert(model: Bert, path: str | Path) -> None:
    """Write config.json + model.safetensors that transformers' BertModel / BertForMaskedLM open."""
    from safetensors.torch import save_file

    from lmforge.io import write_json

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf = to_hf_state_dict(model.state_dict(), model.cfg)
    for tied in ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias"):
        hf.pop(tied, None)  # tied to word embeddings / cls.predictions.bias: safetensors refuses
        # shared storage, and transformers ties them again on load
    save_file({k: v.contiguous() for k, v in hf.items()}, str(path / "model.safetensors"))
    write_json(path / "config.json", to_hf_config(model.cfg, mlm_head=model.head is not None))
