"""`lmforge quantize`: a float model directory -> a quantized one, with the validation
perplexity before and after.

Methods (config `quantize:`): int8 per output channel, optionally with LLM.int8-style float
outlier features; int4 round-to-nearest in groups; gptq (int4, same groups, GPTQ-chosen
values). The output head is int8 unless head_bits is 0; with tied embeddings the input
embedding then reads the same int8 rows. Calibration sequences (GPTQ and outliers) come from
the training shards, never from the validation text the result is measured on.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lmforge.compress.gptq import gptq_model
from lmforge.config import ConfigError, QuantizeConfig
from lmforge.data.loader import PackedLoader, read_manifest
from lmforge.io import atomic_dir, write_json
from lmforge.model.checkpoint import save_quantized
from lmforge.model.load import load, model_source
from lmforge.model.quant import (
    QuantLinear,
    QuantSpec,
    block_linears,
    check_group,
    quantize_head,
    set_module,
)
from lmforge.model.transformer import GPT
from lmforge.perf import pick_device
from lmforge.tokenizer import Tokenizer
from lmforge.train.heldout import evaluate


def output_name(cfg: QuantizeConfig) -> str:
    """The folder under OUT/quantize: int8, int4-g64, gptq-g64 (-act with act_order)."""
    if cfg.method == "int8":
        return "int8"
    return f"{cfg.method}-g{cfg.group_size}" + ("-act" if cfg.act_order else "")


def calibration_ids(data_dir, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """n training sequences of seq_len tokens (S, T), drawn by seed from the prepared shards."""
    loader = PackedLoader(data_dir, seq_len, n, seed)
    return loader.batch_at(0)[0]


@torch.no_grad()
def outlier_features(
    model: GPT, calib: torch.Tensor, threshold: float, limit: int, batch_size: int = 8
) -> dict[str, torch.Tensor]:
    """For each block linear: the input features whose |activation| exceeds threshold on the
    calibration tokens (at most `limit` of them, the largest first; 0 = no limit)."""
    peak: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(mod, inp, out):
            m = inp[0].detach().abs().flatten(0, -2).amax(dim=0)
            peak[name] = m if name not in peak else torch.maximum(peak[name], m)

        return record

    linears = block_linears(model)
    hooks = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    try:
        for s in range(0, len(calib), batch_size):
            model(calib[s : s + batch_size])
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, m in peak.items():
        idx = torch.nonzero(m > threshold).flatten()
        if limit and len(idx) > limit:
            idx = idx[torch.argsort(m[idx], descending=True)[:limit]]
        if len(idx):
            out[name] = torch.sort(idx).values
    return out


def quantize_model(model: GPT, cfg: QuantizeConfig, calib: torch.Tensor | None = None) -> QuantSpec:
    """Quantize model in place per cfg; calib (S, T) token ids for GPTQ and outliers."""
    linears = block_linears(model)
    if cfg.method != "int8":
        for name, lin in linears.items():
            check_group(lin.in_features, cfg.group_size, f"layer {name}")
    outliers: dict[str, torch.Tensor] = {}
    if cfg.method == "int8" and cfg.outlier_threshold > 0:
        outliers = outlier_features(model, calib, cfg.outlier_threshold, cfg.max_outliers)
    if cfg.method == "gptq":
        names = gptq_model(model, calib, cfg.group_size, cfg.block_size, cfg.damp, cfg.act_order)
    else:
        bits = 8 if cfg.method == "int8" else 4
        names = []
        for name, lin in tqdm(linears.items(), desc=cfg.method, unit="layer", leave=False):
            set_module(
                model, name, QuantLinear.from_float(lin, bits, cfg.group_size, outliers.get(name))
            )
            names.append(name)
    if cfg.head_bits == 8:
        quantize_head(model)
    return QuantSpec(
        method=cfg.method,
        bits=8 if cfg.method == "int8" else 4,
        group_size=0 if cfg.method == "int8" else cfg.group_size,
        head_bits=cfg.head_bits,
        outliers={n: len(i) for n, i in outliers.items()},
        modules=names,
    )


def _token_bytes(tok: Tokenizer, vocab: int, device) -> torch.Tensor:
    tb = torch.as_tensor(tok.token_bytes(), dtype=torch.long, device=device)
    return F.pad(tb, (0, max(0, vocab - len(tb))))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's tensors as saved (tied tensors once)."""
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            n += t.numel() * t.element_size()
    return n


def run(cfg: QuantizeConfig, model_dir, data_dir, out_dir) -> dict:
    """Quantize model_dir into out_dir/<method>; summary.json there; returns the summary."""
    t0 = time.perf_counter()
    model_dir, data_dir = Path(model_dir), Path(data_dir)
    device = pick_device(cfg.device)
    # a float model (a LoRA adapter is merged into its base); a quantized one is refused
    model, tok = load(model_dir, device=device, float_only=True)
    source = model_source(model_dir)  # the files behind an adapter: its base's
    need_calib = cfg.method == "gptq" or (cfg.method == "int8" and cfg.outlier_threshold > 0)
    need_data = need_calib or cfg.eval_tokens > 0
    if need_data:
        manifest = read_manifest(data_dir)
        if manifest["vocab_size"] > model.cfg.vocab_size:
            raise ConfigError(
                f"{data_dir} was tokenized with a {manifest['vocab_size']}-token vocabulary, "
                f"but {model_dir} has {model.cfg.vocab_size}: use the shards of its tokenizer"
            )
    seq = min(cfg.calib_seq_len, model.cfg.max_seq_len)
    token_bytes = _token_bytes(tok, model.cfg.vocab_size, device)

    def val() -> dict:
        if not cfg.eval_tokens:
            return {}
        res = evaluate(model, data_dir, seq, 8, cfg.eval_tokens, token_bytes, device)
        return {lang: {k: r[k] for k in ("loss", "bpb")} for lang, r in res.items()}

    before = val()
    size_before = weight_bytes(model)
    calib = None
    if need_calib:
        calib = calibration_ids(data_dir, cfg.calib_samples, seq, cfg.seed).to(device)
    t1 = time.perf_counter()
    spec = quantize_model(model, cfg, calib)
    quant_seconds = time.perf_counter() - t1
    after = val()
    name = output_name(cfg)
    final = Path(out_dir) / name
    with atomic_dir(final) as tmp:
        save_quantized(model, spec, tmp, source, tok.pad_id)
    file_bytes = (final / "model.safetensors").stat().st_size
    float_bytes = (source / "model.safetensors").stat().st_size
    summary = {
        "method": cfg.method,
        "name": name,
        "model_dir": str(model_dir),
        "out": str(final),
        "group_size": spec.group_size,
        "head_bits": cfg.head_bits,
        "outlier_features": sum(spec.outliers.values()),
        "float_file_bytes": float_bytes,
        "file_bytes": file_bytes,
        "float_weight_bytes": size_before,
        "weight_bytes": weight_bytes(model),
        "val_before": before,
        "val_after": after,
        "quantize_seconds": round(quant_seconds, 2),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    write_json(final / "summary.json", summary)
    summary["interrupted"], summary["step"] = False, 0
    summary["headline"] = headline(summary)
    return summary


def headline(s: dict) -> str:
    parts = []
    for lang, a in s["val_after"].items():
        b = s["val_before"][lang]
        ppl_b, ppl_a = math.exp(b["loss"]), math.exp(a["loss"])
        parts.append(f"{lang} ppl {ppl_b:.2f} -> {ppl_a:.2f} ({100 * (ppl_a / ppl_b - 1):+.2f}%)")
    size = f"{s['float_file_bytes'] / 1e6:.1f} MB -> {s['file_bytes'] / 1e6:.1f} MB"
    val = "; ".join(parts) if parts else "validation skipped"
    return f"{s['name']}: {val}; {size}; written to {s['out']}"
