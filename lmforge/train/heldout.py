"""Held-out loss and bits per byte per language: how every stage that trains on token shards
scores a model (pretraining, distillation, pruning's recovery, quantization's check).

The one idea: bits per byte ignores BOS/EOS targets (they have no bytes) and divides by the
bytes of the text, so it compares models across tokenizers; the loss averages over all targets.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lmforge.data.loader import val_batches, val_languages
from lmforge.perf import autocast


@torch.no_grad()
def evaluate(
    model,
    data_dir,
    seq_len: int,
    batch_size: int,
    max_tokens: int,
    token_bytes: torch.Tensor,
    device,
) -> dict:
    """Validation loss (nats/token) and bits per byte for each language's held-out text.
    Bits per byte ignores BOS/EOS targets (they have no bytes), which makes it comparable
    across tokenizers; the loss averages over all targets."""
    was_training = model.training
    model.eval()
    out = {}
    for lang in val_languages(data_dir):
        nll_sum, n_tok, nll_bytes, n_bytes = 0.0, 0, 0.0, 0
        for x, y in val_batches(data_dir, lang, seq_len, batch_size, max_tokens):
            x, y = x.to(device), y.to(device)
            with autocast(device):
                logits = model(x)
            nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
            nb = token_bytes[y.flatten()]
            nll_sum += nll.sum().item()
            n_tok += y.numel()
            nll_bytes += (nll * (nb > 0)).sum().item()
            n_bytes += nb.sum().item()
        if n_tok:
            out[lang] = {
                "loss": nll_sum / n_tok,
                "bpb": nll_bytes / (math.log(2) * max(n_bytes, 1)),
                "tokens": n_tok,
            }
    model.train(was_training)
    return out


def val_row(res: dict) -> dict:
    """evaluate's {lang: {loss, bpb, tokens}} as a metrics row: val_en_loss, val_en_bpb, ..."""
    return {f"val_{lang}_{k}": v for lang, r in res.items() for k, v in r.items() if k != "tokens"}
