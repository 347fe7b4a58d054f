"""Batch-1 decoding on a CPU: one token through the model with as few kernels as possible.

The one idea: a decode step multiplies every weight by one vector, so its floor is the time to
stream the weights from memory (benchmarks/bench_decode.py measures it). Two things stand
between the model's ordinary forward and that floor on a 2-core CPU, and this module removes
both without copying a weight or changing a value:

- MKL runs a matrix-vector product on one core (~20 GB/s here, where two cores stream ~30),
  but spreads a batched product over its threads. So each weight is viewed as one column
  block per thread and multiplied with a single `torch.bmm`. Wide projections (q/k/v, gate/up,
  the output head) also stream faster stored (in, out)-major, so `relayout` gives them that
  storage once (a transposed view of it: same values, same shapes, same state_dict).
- The ordinary forward spends ~30 small kernels and their Python per layer on shapes, masks
  and batching that one token does not need; `CpuDecoder.step` works on flat vectors instead.

It covers the Llama-shaped families (Llama, Qwen2's q/k/v biases, Mistral's sliding window);
`CpuDecoder.supports` says which models it takes. `tests/infer/test_cpu_decode.py` holds the
step to the model's own cached forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.model.transformer import GPT, KVCache


def relayout(model: GPT) -> None:
    """Store every projection with more outputs than inputs (in, out)-major, as a transposed
    view of that storage: MKL streams those ~40% faster in a matrix-vector product. Values,
    shapes and state_dict keys stay; training still works. Idempotent."""
    with torch.inference_mode(False), torch.no_grad():  # plain tensors: the model may train later
        for m in model.modules():
            if (
                isinstance(m, torch.nn.Linear)
                and m.out_features > m.in_features
                and m.weight.is_contiguous()
            ):
                m.weight.data = m.weight.t().contiguous().t()


class CpuDecoder:
    """Decodes one token at a time for a `GPT` on a CPU, reusing its weights and `KVCache`.

    The prompt goes through the model's own forward (prefill); every later token goes through
    `step`. Build it once per model; it holds views of the weights, so it sees later in-place
    updates but not a replaced parameter.
    """

    @staticmethod
    def supports(model) -> bool:
        """True for a `GPT` with RMSNorm, RoPE and SwiGLU (Llama, Qwen2, Mistral), float or
        quantized; GPT-2's LayerNorm, learned positions and GELU decode through the model's own
        forward."""
        if not isinstance(model, GPT):
            return False
        cfg = model.cfg
        return (cfg.norm, cfg.pos, cfg.mlp, cfg.bias) == ("rmsnorm", "rope", "swiglu", False)

    def __init__(self, model: GPT, threads: int | None = None):
        assert self.supports(model), f"CpuDecoder does not support arch {model.cfg.arch!r}"
        relayout(model)
        cfg = model.cfg
        self.model = model
        self.threads = threads or torch.get_num_threads()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.eps = cfg.norm_eps
        self.window = cfg.sliding_window
        self.layers = [
            (
                b.attn_norm.weight,
                self._blocks(b.attn.wqkv),
                b.attn.wqkv.bias if type(b.attn.wqkv) is torch.nn.Linear else None,  # Qwen2
                self._blocks(b.attn.wo),
                b.mlp_norm.weight,
                self._blocks(b.mlp.w13),
                self._blocks(b.mlp.w2),
            )
            for b in model.layers
        ]
        self.head = self._blocks(model.lm_head)

    def _blocks(self, m: torch.nn.Module):
        """A linear layer's (out, in) weight -> (threads, in, out / threads) view; one block when
        out does not split evenly. A quantized layer (model.quant.QuantLinear) stays itself:
        its kernel splits the work over threads and adds its own bias."""
        if type(m) is not torch.nn.Linear:
            return m
        w = m.weight
        n = self.threads if w.shape[0] % self.threads == 0 else 1
        return w.view(n, -1, w.shape[1]).transpose(1, 2)

    @staticmethod
    def _mv(x: torch.Tensor, w) -> torch.Tensor:
        """x (in,) times a blocked weight (n, in, out / n) -> (out,), one block per thread; or
        through a quantized layer."""
        if not isinstance(w, torch.Tensor):
            return w(x.view(1, -1)).view(-1)
        return torch.bmm(x.view(1, 1, -1).expand(w.shape[0], 1, -1), w).view(-1)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm of one vector, fp32 as in the model; the sum of squares as one dot product."""
        return x * torch.rsqrt(torch.dot(x, x) / x.numel() + self.eps) * weight

    def prefill(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run the prompt ids (T,) at positions [0, T) through the model; logits (V,) of the last."""
        return self.model(ids.view(1, -1), cache, 0, last_only=True).view(-1)

    def step(self, token: torch.Tensor, cache: KVCache, pos: int) -> torch.Tensor:
        """Feed one token id (a 1-element tensor) at position `pos`; logits (V,) for the next."""
        H, KV, D = self.n_head, self.n_kv_head, self.head_dim
        model = self.model
        x = model.tok_emb(token.view(-1)).view(-1)
        cos, sin = model.rope_cos[pos], model.rope_sin[pos]  # (D,): the signed-sin table
        start = max(0, pos + 1 - self.window) if self.window else 0  # Mistral's sliding window
        for i, (attn_norm, wqkv, bqkv, wo, mlp_norm, w13, w2) in enumerate(self.layers):
            qkv = self._mv(self._norm(x, attn_norm), wqkv)
            if bqkv is not None:
                qkv = qkv + bqkv
            qkv = qkv.view(H + 2 * KV, D)
            qk = qkv[: H + KV]  # rotate q and k heads together; roll swaps the halves
            qk = torch.addcmul(qk * cos, qk.roll(D // 2, dims=-1), sin)
            k_all, v_all = cache.k[i], cache.v[i]  # (1, KV, max_len, D)
            k_all.select(2, pos).copy_(qk[H:].view(1, KV, D))
            v_all.select(2, pos).copy_(qkv[H + KV :].view(1, KV, D))
            y = F.scaled_dot_product_attention(
                qk[:H].view(1, H, 1, D),
                k_all.narrow(2, start, pos + 1 - start),
                v_all.narrow(2, start, pos + 1 - start),
                enable_gqa=H != KV,
            )
            x = x + self._mv(y.view(-1), wo)
            gate, up = self._mv(self._norm(x, mlp_norm), w13).chunk(2)
            x = x + self._mv(F.silu(gate).mul_(up), w2)
        return self._mv(self._norm(x, model.norm.weight), self.head)
