"""Rollouts for the RL stages (PPO, GRPO): answers sampled from the policy with the inference
engine, then scored token by token by the models being trained.

The one idea: sampling and scoring are separate passes. The engine samples quickly (KV cache,
continuous batching, no autograd); the training forward then recomputes each answer token's
log-probability under the policy, the reference and (PPO) the value head on the padded batch,
so the numbers the loss uses come from exactly the computation it differentiates. An answer
keeps the stop token that ended it: emitting the end-of-turn marker is part of what is learned.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lmforge.infer.engine import Engine, SamplingParams


def sample_answers(
    model,
    prompts: Sequence[Sequence[int]],
    n: int,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] = (),
    seed: int = 0,
    max_batch: int = 32,
) -> list[list[int]]:
    """n sampled answers for each prompt (prompt-major: answers of prompt i are at i*n..i*n+n-1).
    Each is a list of token ids, ending with the stop id when the model stopped itself.
    Request j is seeded with seed + j, so a rollout batch is a pure function of seed.
    The engine relayouts the model's wide weights once (`infer.cpu_decode.relayout`): a
    training driver calls `relayout(model)` itself before making its optimizer, so the
    optimizer's state is created with the parameters' final strides."""
    was_training = model.training
    engine = Engine(model, None, max_batch=max_batch, max_queue=len(prompts) * n + 1)
    params = dict(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    requests = [
        engine.submit(p, SamplingParams(**params, stop_ids=tuple(stop_ids), seed=seed + j))
        for j, p in enumerate(p for p in prompts for _ in range(n))
    ]
    engine.run_until_done()
    model.train(was_training)  # the engine put the model in eval mode
    return [r.output_ids + ([r.stop_token] if r.stop_token is not None else []) for r in requests]


def pad_rollouts(
    prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompt+answer ids (N, T) and the answer mask (N, T-1) over the *targets*
    ids[:, 1:]: mask[i, t] is True where ids[i, t+1] is an answer token."""
    T = max(len(p) + len(a) for p, a in zip(prompts, answers))
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T - 1, dtype=torch.bool)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        ids[i, : len(p) + len(a)] = torch.tensor([*p, *a], dtype=torch.long)
        mask[i, len(p) - 1 : len(p) - 1 + len(a)] = True
    return ids, mask


def token_logprobs(model, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(ids[:, t+1] | ids[:, :t+1]) for every position: (N, T-1). Padding positions are
    computed too (right padding never changes a real one); callers mask them out.
    temperature divides the logits, as the sampler did, so the ratio is against the
    distribution the answers were drawn from."""
    logits = model(ids[:, :-1]).float()
    if temperature != 1.0:
        logits = logits / temperature
    nll = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    return -nll.view(ids.shape[0], -1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over True positions of mask (over all, or along dim)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi: exp(r) - r - 1 with
    r = ref_logp - logp (Schulman's k3: unbiased, always >= 0, zero when pi = ref)."""
    r = ref_logp - logp
    return torch.exp(r) - r - 1
