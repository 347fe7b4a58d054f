"""Model checkpoints as Hugging Face directories: config.json, model.safetensors, tokenizer files,
generation_config.json. transformers opens them with `from_pretrained`; we open theirs.

A quantized checkpoint (`model/quant.py` describes its layout) is the same directory with a
`quantization_config` in config.json and lmforge's own tensor names.

Weights are never pickled. Writing goes through `lmforge.io.atomic_dir` in the caller, so a
checkpoint directory is either complete or absent.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.config import ConfigError, ModelConfig
from lmforge.io import read_json, write_json
from lmforge.model.hf import from_hf_config, from_hf_state_dict, to_hf_config, to_hf_state_dict
from lmforge.model.quant import QuantSpec, build_quantized, quant_spec
from lmforge.model.transformer import GPT, rope_tables
from lmforge.tokenizer import Tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def save_model(
    model: GPT,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    pad_token_id: int | None = None,
) -> None:
    """Write config.json, model.safetensors (HF names of the model's family, `cfg.arch`; fp32 on
    CPU), generation_config.json and copies of the tokenizer files into out_dir (which the caller
    makes atomic)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    write_json(out / "config.json", to_hf_config(cfg, pad_token_id=pad_token_id, torch_dtype=dtype))
    tensors = {k: v.cpu() for k, v in to_hf_state_dict(model.state_dict(), cfg).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    save_extras(cfg, out, tokenizer_dir, pad_token_id)


def save_extras(
    cfg: ModelConfig, out: Path, tokenizer_dir: str | Path | None, pad_token_id: int | None
) -> None:
    """generation_config.json and copies of the tokenizer files: everything of a model
    directory but its config.json and weights."""
    write_json(
        out / "generation_config.json",
        {
            "bos_token_id": cfg.bos_token_id,
            "eos_token_id": stop_token_ids(cfg, tokenizer_dir),
            "pad_token_id": pad_token_id,
            "do_sample": True,
            "temperature": 0.8,
            "top_p": 0.95,
            "max_length": cfg.max_seq_len,
        },
    )
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.exists():
                shutil.copyfile(src, out / name)


def save_quantized(
    model: GPT, spec: QuantSpec, out_dir: str | Path, tokenizer_dir=None, pad_token_id=None
) -> None:
    """config.json (with quantization_config), model.safetensors (lmforge names), the
    generation config and tokenizer files, into out_dir (which the caller makes atomic)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = to_hf_config(model.cfg, pad_token_id=pad_token_id, torch_dtype="float32")
    hf["quantization_config"] = spec.to_json()
    write_json(out / "config.json", hf)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings and "tok_emb.weight" in sd:
        sd.pop("lm_head.weight", None)  # a float head tied to the embedding is stored once
    if spec.bits == 4:  # int4 scales and zeros are float16-exact by construction: store them so
        sd = {k: v.half() if k in _int4_keys(spec) else v for k, v in sd.items()}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "lmforge-quantized"})
    save_extras(model.cfg, out, tokenizer_dir, pad_token_id)


def _int4_keys(spec: QuantSpec) -> set[str]:
    return {f"{name}.{t}" for name in spec.modules for t in ("scales", "zeros")}


def stop_token_ids(cfg: ModelConfig, tokenizer_dir: str | Path | None) -> int | list[int]:
    """generation_config's eos_token_id: EOS, or a list of every id lmforge stops at (EOS and
    <|im_end|>): transformers and vLLM stop only at these, and a chat model ends its turn with
    <|im_end|>, not EOS, so without it they run on past the reply."""
    if tokenizer_dir is None or not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        return cfg.eos_token_id
    ids = [cfg.eos_token_id]
    ids += [i for i in Tokenizer.load(tokenizer_dir).stop_ids() if i != cfg.eos_token_id]
    return ids if len(ids) > 1 else ids[0]


def read_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    files = [ckpt / "model.safetensors"]
    index = ckpt / "model.safetensors.index.json"
    if not files[0].exists() and index.exists():
        weight_map = read_json(index, "safetensors index")["weight_map"]
        files = [ckpt / f for f in sorted(set(weight_map.values()))]
    tensors = {}
    for f in files:
        if not f.exists():
            raise ConfigError(f"checkpoint {ckpt}: weights file {f.name} is missing")
        try:
            tensors.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise ConfigError(
                f"checkpoint {ckpt}: {f.name} is corrupt or truncated ({e})"
            ) from None
    return tensors


def load_config(ckpt: str | Path) -> ModelConfig:
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise ConfigError(f"checkpoint directory not found: {ckpt}")
    try:
        hf = read_json(ckpt / "config.json", "checkpoint config")
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    return from_hf_config(hf)


def load_model(
    ckpt: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    quantized_ok: bool = True,
) -> GPT:
    """Open a HF-layout checkpoint directory (ours or one saved by transformers) of a Llama,
    Qwen2, Mistral, Mixtral, Qwen2-MoE or GPT-2 model; `save_model` writes it back in the same
    family's format.
    A quantized lmforge checkpoint (`lmforge quantize`) opens with its QuantLinear layers, for
    inference; a caller that trains or rewrites weights passes quantized_ok=False and gets a
    clear error instead."""
    ckpt = Path(ckpt)
    cfg = load_config(ckpt)
    q = read_json(ckpt / "config.json", "checkpoint config").get("quantization_config")
    if q is None:
        return model_from_tensors(cfg, read_tensors(ckpt), ckpt, device, dtype)
    if not quantized_ok:  # refused before its quantization_config is even validated
        method = q.get("method") or q.get("quant_method") if isinstance(q, dict) else "?"
        raise ConfigError(
            f"{ckpt} is a quantized ({method}) checkpoint: it is for inference only; "
            "train, prune, quantize or export from the float model it was made from"
        )
    return load_quantized(cfg, quant_spec(ckpt), read_tensors(ckpt), ckpt, device)


def model_from_tensors(
    cfg: ModelConfig,
    tensors: dict[str, torch.Tensor],
    ckpt: Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> GPT:
    """A GPT from a family's HF tensors (shapes checked against cfg; ckpt names the source)."""
    with torch.device("meta"):
        model = GPT(cfg)
    sd = from_hf_state_dict(tensors, cfg)
    for name, t in sd.items():
        expected = model.state_dict()[name].shape
        if t.shape != expected:
            raise ConfigError(
                f"checkpoint {ckpt}: tensor for {name} has shape {tuple(t.shape)}, config implies {tuple(expected)}"
            )
    model.load_state_dict(sd, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    rope = cfg.pos == "rope"
    if rope:  # the tables were created on the meta device: rebuild them for real (they stay fp32)
        model.rope_cos, model.rope_sin = rope_tables(
            cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling
        )
    model.to(device=device, dtype=dtype)
    if rope:
        model.rope_cos, model.rope_sin = model.rope_cos.float(), model.rope_sin.float()
    return model.eval()


def load_quantized(cfg, spec: QuantSpec, tensors: dict, ckpt: Path, device="cpu") -> GPT:
    """A quantized GPT from its checkpoint tensors (lmforge names), shapes checked."""
    with torch.device("meta"):
        model = build_quantized(GPT(cfg), spec)
    expected = model.state_dict()
    if cfg.tie_embeddings and spec.head_bits == 8:
        expected.pop("tok_emb.weight", None)
    if cfg.tie_embeddings and spec.head_bits != 8:
        expected.pop("lm_head.weight", None)
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise ConfigError(
            f"quantized checkpoint {ckpt}: missing tensors {missing[:5]}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    sd = {}
    for k, ref in expected.items():
        t = tensors[k]
        if t.shape != ref.shape:
            raise ConfigError(
                f"quantized checkpoint {ckpt}: tensor {k} has shape {tuple(t.shape)}, "
                f"expected {tuple(ref.shape)}"
            )
        sd[k] = t.to(ref.dtype)
    model.load_state_dict(sd, strict=False, assign=True)
    if cfg.tie_embeddings and spec.head_bits != 8:
        model.lm_head.weight = model.tok_emb.weight
    if cfg.pos == "rope":
        model.rope_cos, model.rope_sin = rope_tables(
            cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling
        )
    return model.to(device).eval()
