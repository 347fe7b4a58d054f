"""A sparse mixture of experts in place of the dense MLP (Mixtral, arXiv:2401.04088): a router
scores the experts for each token, the token goes through its top-k SwiGLU experts, and their
outputs are summed with the router's softmax weights, renormalised over the k chosen (Qwen2-MoE
leaves them unnormalised and adds a shared expert that every token goes through, scaled by a
sigmoid gate).

The one idea: dispatch is a sort. The N*k (token, expert) slots are sorted by expert, so each
expert's tokens form one contiguous slice and the expert is one matmul over it: a loop over
experts, never over tokens. The experts' weights are stacked, (n_experts, ...), as transformers 5
holds them (`experts.gate_up_proj`, `experts.down_proj`).

Training adds two auxiliary losses, which the module keeps after each forward as `aux_loss`
(already weighted; `model/transformer.py:aux_loss` sums them over the model, so a training step
needs no MoE branch): the Switch/GShard load-balancing loss, which pushes the router towards
spreading tokens evenly, and the ST-MoE router z-loss, which keeps the router's logits small
(large logits make the softmax, and so the routing, numerically brittle). `aux_metrics` holds
the numbers to log: both losses, the share of slots dropped over capacity, the least and most
used experts' shares, and each expert's share (the utilisation histogram, `moe_share_{i}`);
`tokens_per_expert` the last forward's counts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig


def route(
    logits: torch.Tensor, k: int, norm_topk: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax over the experts, then the top k, their weights renormalised to sum to 1 when
    norm_topk (as transformers' MixtralTopKRouter; Qwen2-MoE keeps the raw probabilities).
    logits (N, E) float32 -> weights (N, k), experts (N, k), probs (N, E)."""
    probs = logits.softmax(dim=-1)
    top, experts = probs.topk(k, dim=-1)
    return top / top.sum(dim=-1, keepdim=True) if norm_topk else top, experts, probs


def dispatch(experts: torch.Tensor, n_experts: int, capacity: int | None):
    """The slots (token, choice) sorted by expert: their indices into the choice-major flat list
    (slot s = choice * N + token), and how many of each expert's slots run (E,) after `capacity`.
    Choice-major plus a stable sort puts every token's first choice before any second choice
    within an expert, so a full expert drops second choices first (GShard's priority)."""
    flat = experts.t().reshape(-1)  # (k * N,)
    order = flat.argsort(stable=True)  # (k * N,): expert by expert
    counts = torch.bincount(flat, minlength=n_experts)  # (E,) slots routed to each expert
    if capacity is None:
        return order, counts, counts
    starts = counts.cumsum(0) - counts  # (E,) where each expert's run begins in `order`
    rank = torch.arange(len(order), device=order.device) - starts[flat[order]]
    return order[rank < capacity], counts, counts.clamp(max=capacity)


def load_balancing_loss(probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Switch/GShard (arXiv:2101.03961, eq. 4-6): E * sum_i f_i * P_i, f_i the fraction of
    tokens routed to expert i (counting all k choices), P_i its mean router probability.
    Exactly transformers' load_balancing_loss_func for one layer: f sums to k, so perfectly even
    routing scores k (the minimum) and everything on one expert scores k * E."""
    N, E = probs.shape
    f = counts.float() / N  # (E,)
    return E * (f * probs.mean(dim=0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss (arXiv:2202.08906, eq. 5): the mean of logsumexp(logits)^2."""
    return torch.logsumexp(logits, dim=-1).square().mean()


class MoE(nn.Module):
    """Top-k routed SwiGLU experts (and Qwen2-MoE's shared one): a `mlp: moe` block's MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, F_ = cfg.n_experts, cfg.dim, cfg.ffn_dim
        self.n_experts, self.k, self.capacity_factor = E, cfg.experts_per_token, cfg.capacity_factor
        self.norm_topk = cfg.norm_topk
        # a layer's share of the weights: summed over the layers, the losses are their mean
        self.aux_coef, self.z_coef = cfg.moe_aux_coef / cfg.n_layer, cfg.moe_z_coef / cfg.n_layer
        self.router = nn.Linear(D, E, bias=False)
        self.w13 = nn.Parameter(torch.empty(E, 2 * F_, D))  # each expert's gate and up, fused
        self.w2 = nn.Parameter(torch.empty(E, D, F_))  # each expert's down (a residual writer)
        S = cfg.shared_expert_dim  # Qwen2-MoE: one SwiGLU MLP for every token, gated
        self.shared_w13 = nn.Linear(D, 2 * S, bias=False) if S else None
        self.shared_w2 = nn.Linear(S, D, bias=False) if S else None
        self.shared_gate = nn.Linear(D, 1, bias=False) if S else None
        self.aux_loss: torch.Tensor | None = None
        self.aux_metrics: dict[str, torch.Tensor] = {}
        self.tokens_per_expert: torch.Tensor | None = None

    def capacity(self, n_tokens: int) -> int | None:
        """Slots per expert: capacity_factor times an even share of the N*k slots; None = all."""
        if not self.capacity_factor:
            return None
        return math.ceil(self.capacity_factor * n_tokens * self.k / self.n_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        x = x.reshape(B * T, D)  # (N, D)
        logits = self.router(x).float()  # (N, E): routed in float32, as transformers does
        weights, experts, probs = route(logits, self.k, self.norm_topk)  # (N, k), (N, k), (N, E)
        order, counts, run = dispatch(experts, self.n_experts, self.capacity(B * T))
        token, choice = order % (B * T), order // (B * T)  # (S,) each kept slot's token, rank
        ys = self.run_experts(x[token], run.tolist())  # (S, D); tolist: the one host sync
        ys = ys * weights[token, choice].unsqueeze(-1).to(ys.dtype)
        # a dropped slot adds nothing; in the experts' dtype (bf16 under autocast), as a Linear's
        out = x.new_zeros(x.shape, dtype=ys.dtype).index_add_(0, token, ys)
        if self.shared_w13 is not None:
            gate, up = self.shared_w13(x).chunk(2, dim=-1)
            out = out + torch.sigmoid(self.shared_gate(x)) * self.shared_w2(F.silu(gate) * up)
        self.record(logits, probs, counts, len(order))
        return out.view(B, T, D)

    def run_experts(self, xs: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """xs (S, D), sorted by expert with sizes[e] rows for expert e -> each row's expert output."""
        outs = []
        for e, xe in enumerate(xs.split(sizes)):
            if not sizes[e]:
                continue
            gate, up = F.linear(xe, self.w13[e]).chunk(2, dim=-1)
            outs.append(F.linear(F.silu(gate) * up, self.w2[e]))
        return torch.cat(outs) if outs else xs[:0]

    def record(self, logits, probs, counts, kept: int) -> None:
        """The auxiliary loss and the metrics of this forward, kept for the training step."""
        lb, z = load_balancing_loss(probs, counts), z_loss(logits)
        self.aux_loss = self.aux_coef * lb + self.z_coef * z
        slots = counts.sum().clamp(min=1)
        share = counts.float() / slots
        self.tokens_per_expert = counts.detach()
        self.aux_metrics = {
            "moe_lb": lb.detach(),
            "moe_z": z.detach(),
            "moe_dropped": (slots - kept) / slots,
            "moe_min_share": share.min(),
            "moe_max_share": share.max(),
        } | {f"moe_share_{i}": s for i, s in enumerate(share.detach())}
