"""GPTQ (OPTQ; Frantar et al., 2023): int4 weights chosen with second-order information from
calibration activations, one Transformer block at a time.

The one idea: quantizing a layer's weights W (N, K) should keep its outputs X W^T, not the
weights themselves, close. With H = 2 X^T X (the Hessian of that squared error, from the
layer's calibration inputs X), columns are quantized one by one and each one's rounding error
is spread over the columns not yet quantized, weighted by the inverse Hessian: the later columns
absorb what the earlier ones lost. Details as in the paper: the inverse Hessian's upper Cholesky
factor gives the update rows; errors are applied lazily in blocks of `block_size` columns
(one matmul per block instead of one per column); `damp` times the mean diagonal is added to H
for stability; `act_order` quantizes the columns with the largest Hessian diagonal first, with
the groups' scales fixed beforehand (static groups) so groups stay contiguous in storage.

Blocks are processed in order: each block's Hessians come from the outputs of the blocks
before it, already quantized, so later blocks correct for earlier blocks' errors.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from lmforge.model.quant import QuantLinear, int4_params, quantize_int4, set_module
from lmforge.model.transformer import GPT


class Hessian:
    """Running H = 2/n sum x x^T over every input row x a linear layer sees."""

    def __init__(self, dim: int, device):
        self.H = torch.zeros(dim, dim, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.H.addmm_(x.t(), x)


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    group_size: int,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Int4 values q (N, K) in [0, 15], scale and zero (N, K // group_size) for W (N, K), given
    the Hessian H (K, K) of its inputs. Dequantised: (q - zero) * scale per group."""
    W = W.detach().float().clone()
    H = H.clone()
    N, K = W.shape
    G = K // group_size
    dead = torch.diag(H) == 0  # inputs that were always zero: their weights do not matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    scale = torch.empty(N, G, device=W.device)
    zero = torch.empty(N, G, device=W.device)
    if act_order:  # static groups: fix every group's grid from the unquantized weights
        scale, zero = int4_params(W, group_size)
        perm = torch.argsort(torch.diag(H), descending=True)
    else:
        perm = torch.arange(K, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    group_of = perm // group_size  # the (storage) group of each column in processing order

    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)

    # without act_order a group never straddles two blocks: blocks are whole groups
    block = max(group_size, block_size // group_size * group_size)
    Q = torch.zeros_like(W)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[:, i1:i2].clone()
        Err = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = int(group_of[col])
            if not act_order and col % group_size == 0:  # the grid from the updated weights
                s, z = int4_params(W1[:, i : i + group_size], group_size)
                scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
            w = W1[:, i]
            s, z = scale[:, g], zero[:, g]
            q = torch.round(w / s + z).clamp_(0, 15)
            deq = (q - z) * s
            Q[:, col] = deq
            err = (w - deq) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err[:, i] = err
        W[:, i2:] -= Err @ Hinv[i1:i2, i2:]

    Q = Q[:, torch.argsort(perm)]  # back to storage order
    return quantize_int4(Q, scale, zero, group_size), scale, zero


def _block_inputs(model: GPT, idx: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """The first block's inputs for token ids idx (S, T) and the rotary tables its attention
    needs (GPT.features up to the first block)."""
    T = idx.shape[1]
    x = model.tok_emb(idx)
    if model.pos_emb is None:
        rope = (model.rope_cos[:T].unsqueeze(1), model.rope_sin[:T].unsqueeze(1))
    else:
        x = x + model.pos_emb.weight[:T]
        rope = (None, None)
    return x, rope


@torch.no_grad()
def gptq_model(
    model: GPT,
    calib: torch.Tensor,
    group_size: int,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    batch_size: int = 8,
) -> list[str]:
    """Replace every linear layer of the Transformer blocks with a GPTQ int4 QuantLinear,
    calibrated on token ids calib (S, T). Returns the replaced module names."""
    x, (cos, sin) = _block_inputs(model, calib)
    names = []
    bar = tqdm(model.layers, desc="gptq", unit="block", dynamic_ncols=True)
    for li, block in enumerate(bar):
        linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        hess = {n: Hessian(m.in_features, x.device) for n, m in linears.items()}
        hooks = [
            m.register_forward_hook(lambda mod, inp, out, h=hess[n]: h.add(inp[0]))
            for n, m in linears.items()
        ]
        for s in range(0, len(x), batch_size):
            block(x[s : s + batch_size], cos, sin)
        for h in hooks:
            h.remove()
        for n, lin in linears.items():
            q, scale, zero = gptq_quantize(
                lin.weight, hess[n].H, group_size, block_size, damp, act_order
            )
            ql = QuantLinear(
                lin.in_features,
                lin.out_features,
                4,
                group_size,
                lin.bias is not None,
                device=lin.weight.device,
            )
            ql.set_int4(q, scale, zero)
            if lin.bias is not None:
                ql.bias.copy_(lin.bias.float())
            set_module(block, n, ql)
            names.append(f"layers.{li}.{n}")
        # the next block sees this block's outputs with its weights already quantized
        x = torch.cat(
            [block(x[s : s + batch_size], cos, sin) for s in range(0, len(x), batch_size)]
        )
    return names
