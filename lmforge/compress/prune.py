"""Pruning (`lmforge prune`): remove weights from a trained model, then optionally fine-tune it
for a few steps to recover (with the pruned weights held at zero).

Three methods, all on the linear layers of the Transformer blocks (embeddings, the output head
and norms are left alone):
- `magnitude`: unstructured; the smallest |w| fraction of each matrix is set to zero.
- `2:4`: in every group of 4 consecutive inputs of each output row, the 2 largest |w| stay:
  the 50% pattern sparse tensor cores execute (NVIDIA Ampere and later).
- `structured`: whole attention heads and MLP channels are cut out, giving a smaller dense
  model with a new config that any runtime runs faster.

The one idea: masked weights are still stored (dense), so magnitude and 2:4 shrink nothing by
themselves; they need sparse kernels. Structured pruning shrinks the matrices. It keeps the
heads and channels that add the most to the residual stream on calibration text: head h of a
layer scores the mean over tokens of ||W_o[:, h] y_h|| (its attention output y_h as the output
projection writes it), MLP channel j scores mean |a_j| * ||W_2[:, j]|| (its activation times
its column of the down projection): both are the norm of what the unit adds to the stream.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

from lmforge.compress.train import (
    byte_table,
    check_data,
    count_nonzero,
    load_float_model,
    setup_device,
    train,
    validate,
)
from lmforge.config import ConfigError, DistConfig, PruneConfig
from lmforge.data.loader import PackedLoader
from lmforge.io import write_json
from lmforge.model.checkpoint import model_from_tensors
from lmforge.model.hf import to_hf_state_dict
from lmforge.model.quant import block_linears
from lmforge.model.transformer import GPT, num_params
from lmforge.train import dist
from lmforge.train.checkpoint import save_final
from lmforge.train.run_dir import run_config, start_run

OUT_NAMES = {"magnitude": "magnitude", "2:4": "2of4", "structured": "structured"}

# --------------------------------------------------------------------------- masks


def magnitude_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True where a weight stays: all but the round(sparsity * numel) smallest |w| (ties are
    broken by position, so exactly that many go)."""
    n_zero = round(sparsity * w.numel())
    keep = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
    keep[torch.argsort(w.abs().flatten(), stable=True)[:n_zero]] = False
    return keep.view_as(w)


def two_four_mask(w: torch.Tensor) -> torch.Tensor:
    """True where a weight stays: the 2 largest |w| of every 4 consecutive inputs of a row."""
    out_features, in_features = w.shape
    groups = w.abs().view(out_features, in_features // 4, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(2, dim=-1).indices, True)
    return keep.view_as(w)


def weight_masks(model: GPT, cfg: PruneConfig) -> dict[str, torch.Tensor]:
    """Parameter name -> keep mask for every block linear's weight (biases are kept)."""
    masks = {}
    for name, linear in block_linears(model).items():
        w = linear.weight.detach()
        if cfg.method == "2:4":
            if w.shape[1] % 4:
                raise ConfigError(
                    f"prune.method 2:4 needs inputs in groups of 4, but {name} has {w.shape[1]}"
                )
            masks[f"{name}.weight"] = two_four_mask(w)
        else:
            masks[f"{name}.weight"] = magnitude_mask(w, cfg.sparsity)
    return masks


@torch.no_grad()
def apply_masks(model: GPT, masks: dict[str, torch.Tensor]) -> None:
    for name, keep in masks.items():
        model.get_parameter(name).mul_(keep)


# --------------------------------------------------------------------------- structured


@torch.no_grad()
def importance(model: GPT, batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean norm of what each attention head and MLP channel adds to the residual stream over
    the calibration tokens: (n_layer, n_head) and (n_layer, ffn_dim). See the module docstring."""
    cfg = model.cfg
    H, D = cfg.n_head, cfg.head_dim
    heads = torch.zeros(cfg.n_layer, H, dtype=torch.float64)
    channels = torch.zeros(cfg.n_layer, cfg.ffn_dim, dtype=torch.float64)
    hooks = []
    for i, block in enumerate(model.layers):
        wo = block.attn.wo.weight.float().view(cfg.dim, H, D)
        gram = torch.einsum("ohd,ohe->hde", wo, wo)  # (H, D, D): ||W_h y||^2 = y^T W_h^T W_h y
        w2_norms = block.mlp.w2.weight.float().norm(dim=0)  # (ffn_dim,)

        def on_heads(module, args, i=i, gram=gram):
            y = args[0].float().reshape(-1, H, D)  # (N, H, D): each head's attention output
            sq = torch.einsum("nhd,hde,nhe->nh", y, gram, y)
            heads[i] += sq.clamp(min=0).sqrt().sum(0).double().cpu()

        def on_channels(module, args, i=i, w2_norms=w2_norms):
            a = args[0].float().reshape(-1, args[0].shape[-1])  # (N, ffn_dim): MLP activations
            channels[i] += (a.abs().sum(0) * w2_norms).double().cpu()

        hooks.append(block.attn.wo.register_forward_pre_hook(on_heads))
        hooks.append(block.mlp.w2.register_forward_pre_hook(on_channels))
    n_tokens = 0
    try:
        for x in batches:
            model(x)
            n_tokens += x.numel()
    finally:
        for h in hooks:
            h.remove()
    return heads / n_tokens, channels / n_tokens


def count_removed(fraction: float, total: int, what: str, key: str) -> int:
    """How many of `total` units a fraction removes (rounded), refusing 0 left or 0 removed."""
    n = int(fraction * total + 0.5)
    if fraction and n == 0:
        raise ConfigError(
            f"prune.{key} {fraction} of {total} {what} removes none (it rounds to 0); "
            f"use at least {0.5 / total:.3f}, or 0"
        )
    if n >= total:
        raise ConfigError(f"prune.{key} {fraction} would remove all {total} {what} of a layer")
    return n


def keep_plan(model: GPT, cfg: PruneConfig, head_scores, channel_scores) -> dict:
    """Per layer, the sorted indices of the query heads, key/value heads and MLP channels that
    stay. With grouped-query attention whole groups (a kv head and its query heads) go, so the
    ratio n_head / n_kv_head stays an integer; every layer keeps the same counts (one config)."""
    mc = model.cfg
    group = mc.n_head // mc.n_kv_head
    if cfg.heads and mc.arch == "gpt2":
        raise ConfigError(
            "prune.heads: GPT-2 checkpoints tie the head count to the width (c_attn is three "
            "dim x dim blocks), so heads cannot be removed; use prune.heads 0"
        )
    what = "kv groups" if group > 1 else "heads"
    n_groups = mc.n_kv_head - count_removed(cfg.heads, mc.n_kv_head, what, "heads")
    if mc.arch == "llama" and mc.dim % (n_groups * group):
        # our model computes with head_dim, but transformers' LlamaConfig refuses to open a
        # config whose hidden_size is not a multiple of num_attention_heads
        ok = [k for k in range(1, mc.n_kv_head) if mc.dim % (k * group) == 0]
        fractions = ", ".join(f"{1 - k / mc.n_kv_head:.2f}" for k in reversed(ok)) or "none"
        raise ConfigError(
            f"prune.heads {cfg.heads} leaves {n_groups * group} heads, which do not divide "
            f"dim {mc.dim}: transformers' LlamaConfig requires that. Fractions that work: "
            f"{fractions}, or 0"
        )
    n_channels = mc.ffn_dim - count_removed(cfg.ffn, mc.ffn_dim, "MLP channels", "ffn")
    plan = {"q": [], "kv": [], "ffn": []}
    for i in range(mc.n_layer):
        group_scores = head_scores[i].view(mc.n_kv_head, group).sum(-1)
        kv = group_scores.topk(n_groups).indices.sort().values
        plan["kv"].append(kv)
        plan["q"].append((kv[:, None] * group + torch.arange(group)).flatten())
        plan["ffn"].append(channel_scores[i].topk(n_channels).indices.sort().values)
    return plan


def cut(model: GPT, plan: dict) -> GPT:
    """A smaller GPT holding only the planned heads and channels (head_dim stays explicit, so
    q/k/v keep their width when n_head * head_dim no longer equals dim)."""
    mc = model.cfg
    D, F_ = mc.head_dim, mc.ffn_dim
    new_cfg = dataclasses.replace(
        mc,
        n_head=len(plan["q"][0]),
        n_kv_head=len(plan["kv"][0]),
        head_dim=D,
        ffn_dim=len(plan["ffn"][0]),
    )
    sd = model.state_dict()

    def head_rows(heads: torch.Tensor, offset: int) -> torch.Tensor:  # rows of heads, D each
        return ((offset + heads)[:, None] * D + torch.arange(D)).flatten()

    for i in range(mc.n_layer):
        p = f"layers.{i}."
        q, kv, ch = plan["q"][i], plan["kv"][i], plan["ffn"][i]
        # wqkv rows: [q heads | k heads | v heads]; wo columns: q heads
        rows = torch.cat(
            [head_rows(q, 0), head_rows(kv, mc.n_head), head_rows(kv, mc.n_head + mc.n_kv_head)]
        )
        for kind in ("weight", "bias"):
            if p + f"attn.wqkv.{kind}" in sd:
                sd[p + f"attn.wqkv.{kind}"] = sd[p + f"attn.wqkv.{kind}"][rows]
        sd[p + "attn.wo.weight"] = sd[p + "attn.wo.weight"][:, head_rows(q, 0)]
        # MLP: the channel's input rows (gate and up, or w1) and its w2 column
        up = p + ("mlp.w13" if mc.mlp == "swiglu" else "mlp.w1")
        up_rows = torch.cat([ch, F_ + ch]) if mc.mlp == "swiglu" else ch
        for kind in ("weight", "bias"):
            if f"{up}.{kind}" in sd:
                sd[f"{up}.{kind}"] = sd[f"{up}.{kind}"][up_rows]
        sd[p + "mlp.w2.weight"] = sd[p + "mlp.w2.weight"][:, ch]
    device = next(model.parameters()).device
    return model_from_tensors(new_cfg, to_hf_state_dict(sd, new_cfg), Path("<pruned>"), device)


def calibration_batches(cfg: PruneConfig, data_dir, device) -> list[torch.Tensor]:
    """cfg.calib_samples training sequences (the loader's first, for cfg.seed), in batches."""
    loader = PackedLoader(data_dir, cfg.seq_len, cfg.calib_samples, cfg.seed)
    x, _ = loader.batch_at(0)
    return [b.to(device) for b in x.split(cfg.batch_size)]


@torch.no_grad()
def forward_ms_per_token(models: list[GPT], seq_len: int, repeats: int = 9) -> list[float]:
    """Batch-1 forward time over seq_len tokens, per token, for each model: the median of
    `repeats`, the models taking turns so a busy machine slows them alike."""
    x = torch.randint(
        0, models[0].cfg.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0)
    )
    x = x.to(next(models[0].parameters()).device)
    times = [[] for _ in models]
    for m in models:
        m(x)  # warm-up
    for _ in range(repeats):
        for m, t in zip(models, times):
            if x.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            m(x)
            if x.is_cuda:
                torch.cuda.synchronize()
            t.append(time.perf_counter() - t0)
    return [1000 * statistics.median(t) / seq_len for t in times]


# --------------------------------------------------------------------------- driver


def run(cfg: PruneConfig, model_dir, data_dir, out_dir, dist_cfg: DistConfig | None = None) -> dict:
    """Prune the model in model_dir with cfg.method, recover for cfg.max_steps; writes
    out_dir/<method>/model and out_dir/<method>/summary.json. Returns the summary. Under
    torchrun (dist.strategy ddp) every rank prunes alike and the recovery splits the data."""
    args = (cfg, Path(model_dir), Path(data_dir), Path(out_dir) / OUT_NAMES[cfg.method])
    return dist.launch(dist_cfg, _run, *args)


def _run(cfg, model_dir: Path, data_dir: Path, out: Path, dist_cfg, info) -> dict:
    # --- setup
    dist.ddp_only(info, "prune")
    device = setup_device(cfg, info)
    model, tokenizer, source = load_float_model(model_dir, device, "prune")
    if cfg.method == "structured" and model.cfg.mlp == "moe":  # channels of one dense MLP
        raise ConfigError(
            f"prune.method structured removes MLP channels of a dense model; {model_dir} is a "
            "mixture of experts (mlp moe): use method magnitude or 2:4 (attention layers only)"
        )
    check_data(data_dir, tokenizer, model, cfg.seq_len, "prune")
    token_bytes = byte_table(tokenizer, model.cfg.vocab_size, device)
    start_run(
        out,
        "prune",
        run_config(cfg, dp_size=info.dp_size, model_dir=model_dir, data_dir=data_dir),
        cfg.resume,
        cfg.overwrite,
        info,
    )
    summary = {
        "method": cfg.method,
        "base_model": str(model_dir),
        "params_before": num_params(model),
    }
    summary["val_before"] = validate(model, cfg, data_dir, token_bytes)

    # --- prune
    masks = {}
    if cfg.method == "structured":
        head_scores, channel_scores = importance(model, calibration_batches(cfg, data_dir, device))
        pruned = cut(model, keep_plan(model, cfg, head_scores, channel_scores))
        before_ms, after_ms = forward_ms_per_token([model, pruned], cfg.seq_len)
        summary["forward_ms_per_token"] = {"before": before_ms, "after": after_ms}
        summary["shape"] = {
            k: [getattr(model.cfg, k), getattr(pruned.cfg, k)]
            for k in ("n_head", "n_kv_head", "ffn_dim")
        }
        del model
    else:
        masks = weight_masks(model, cfg)
        apply_masks(model, masks)
        pruned = model
        summary["sparsity"] = 1 - sum(int(m.sum()) for m in masks.values()) / sum(
            m.numel() for m in masks.values()
        )
    summary["params_after"] = num_params(pruned)
    summary["nonzero_after"] = count_nonzero(pruned)
    summary["val_pruned"] = validate(pruned, cfg, data_dir, token_bytes)
    summary["model"] = dataclasses.asdict(pruned.cfg)

    # --- recover
    summary["step"], summary["interrupted"], summary["val_recovered"] = 0, False, None
    if cfg.max_steps:
        after_step = (lambda m: apply_masks(m, masks)) if masks else None
        rec = train(
            pruned,
            cfg,
            data_dir,
            out,
            source,
            after_step=after_step,
            desc=f"recover {cfg.method}",
            dist_cfg=dist_cfg,
            info=info,
        )
        if not info.is_main:
            return {"step": rec["step"], "interrupted": rec["interrupted"], "rank": info.rank}
        summary.update(step=rec["step"], interrupted=rec["interrupted"], recovery=rec)
        if rec["interrupted"]:
            return summary
        summary["val_recovered"] = rec["val"]
        summary["nonzero_after"] = count_nonzero(pruned)
    else:
        save_final(pruned, out / "model", info, tokenizer_dir=source, pad_token_id=tokenizer.pad_id)
        if not info.is_main:
            return {"step": 0, "interrupted": False, "rank": info.rank}

    # --- outputs
    summary["headline"] = headline(summary)
    write_json(out / "summary.json", summary)
    print(f"pruned model written to {out / 'model'}", file=sys.stderr)
    return summary


def headline(s: dict) -> str:
    """'structured: 3.34 M -> 2.71 M params (...); val en 5.72 -> 6.40 -> 5.95, zh ...'"""
    m = lambda n: f"{n / 1e6:.2f} M"  # noqa: E731
    if s["method"] == "structured":
        shape = ", ".join(f"{k} {a} -> {b}" for k, a, b in ((k, *v) for k, v in s["shape"].items()))
        size = f"{m(s['params_before'])} -> {m(s['params_after'])} params ({shape})"
    else:
        size = f"{m(s['nonzero_after'])} of {m(s['params_after'])} params nonzero ({100 * s['sparsity']:.0f}% of block weights zero)"
    stages = [s["val_before"], s["val_pruned"]] + (
        [s["val_recovered"]] if s["val_recovered"] else []
    )
    order = "before -> pruned" + (" -> recovered" if s["val_recovered"] else "")
    val = ", ".join(
        f"{lang} " + " -> ".join(f"{v[lang]['loss']:.2f}" for v in stages)
        for lang in s["val_before"]
    )
    line = f"{s['method']}: {size}; val {val} nats/token ({order})"
    if "forward_ms_per_token" in s:
        t = s["forward_ms_per_token"]
        line += f"; batch-1 forward {t['before']:.3f} -> {t['after']:.3f} ms/token"
    return line
