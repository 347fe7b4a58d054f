"""Masked-language-model pretraining of the BERT encoder, on the common training clock.

The one idea (BERT, arXiv:1810.04805, section 3.1): pick 15% of the real tokens as targets; of
those, 80% are replaced by [MASK], 10% by a random token and 10% kept, so the encoder cannot
learn that only [MASK] positions matter (at fine-tuning time there is no [MASK]). The loss is
cross-entropy at the targets only. `mlm_train_step` is the stage's `train_step` for
`train/loop.py:fit`; the clock (schedule, logging, saving, Ctrl-C) is fit's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from lmforge.model.bert import Bert

IGNORE = -100  # cross_entropy's ignore_index: positions that are not targets


def mask_tokens(
    ids: torch.Tensor,
    special: torch.Tensor,
    mask_id: int,
    vocab_size: int,
    generator: torch.Generator,
    p: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (B, T), special (B, T) bool (padding, [CLS], [SEP]: never targets) -> (inputs,
    labels): labels hold the original id at the targets and IGNORE elsewhere."""
    draw = torch.rand(ids.shape, generator=generator)
    target = (draw < p) & ~special
    labels = torch.where(target, ids, IGNORE)
    kind = torch.rand(ids.shape, generator=generator)  # 80 / 10 / 10 within the targets
    random_ids = torch.randint(0, vocab_size, ids.shape, generator=generator)
    inputs = torch.where(target & (kind < 0.8), mask_id, ids)
    inputs = torch.where(target & (kind >= 0.8) & (kind < 0.9), random_ids, inputs)
    return inputs, labels


def mlm_loss(model: Bert, inputs, labels, attention_mask) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over the targets, number of targets)."""
    logits = model.mlm_logits(model(inputs, attention_mask))  # (B, T, V)
    loss = F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    return loss, int((labels != IGNORE).sum())


def mlm_train_step(
    model: Bert,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    mask_id: int,
    seed: int = 0,
    grad_clip: float = 1.0,
) -> Callable[[int], dict]:
    """The `train_step(step)` fit runs: one batch (ids, attention_mask, special) from `batches`,
    masked with a generator seeded by the step (a resumed run masks as the first one did)."""

    def train_step(step: int) -> dict:
        ids, attention_mask, special = next(batches)
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        inputs, labels = mask_tokens(ids, special, mask_id, model.cfg.vocab_size, g)
        loss_sum, n = mlm_loss(model, inputs, labels, attention_mask)
        (loss_sum / max(n, 1)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # a ratio of sums: the loss per target token, however many targets each batch drew
        return {"loss": (loss_sum.detach(), n), "tokens": int(attention_mask.sum())}

    return train_step
