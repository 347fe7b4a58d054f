"""Decode speed and decode memory against context length: Mamba's recurrent state vs the dense
Transformer's KV cache, batch 1, on the CPU, at about equal parameter counts (random weights).

Regime: one sequence, a prompt of `context` tokens prefilled, then new tokens one at a time.
The Transformer's per-token work and its cache grow with the context (every new token attends to
all cached keys; the cache holds n_layer * 2 * n_kv_head * head_dim floats per position); Mamba's
state is (conv_kernel - 1 + d_state) * d_inner floats per layer whatever the context, and its
per-token work is constant. The dense model decodes through `CpuDecoder`, the path
`lmforge generate` takes on a CPU ("dense"), and through its plain cached forward
("dense-forward"); Mamba through its own forward with a `MambaCache` (its one-token step), the
path `generate` takes for it. The state's bytes are counted from the tensors allocated, not estimated.

    OMP_NUM_THREADS=1 python benchmarks/mamba_decode.py                 # 256, 2048, 8192
    OMP_NUM_THREADS=1 python benchmarks/mamba_decode.py --contexts 256 --steps 16
"""

from __future__ import annotations

import argparse
import time

import torch
from common import environment, median, print_json, print_table

from lmforge.config import ModelConfig
from lmforge.infer.cpu_decode import CpuDecoder
from lmforge.model.mamba import Mamba, MambaConfig
from lmforge.model.transformer import GPT, num_params


def models(vocab: int, max_len: int) -> dict[str, torch.nn.Module]:
    """A dense Llama-style decoder and a Mamba of about the same size (a Mamba layer at
    expand 2 has ~6.8 dim^2 parameters, a dense one ~12.3 dim^2: twice the layers)."""
    torch.manual_seed(0)
    dense = ModelConfig(vocab_size=vocab, dim=256, n_layer=4, n_head=4, max_seq_len=max_len)
    ssm = MambaConfig(vocab_size=vocab, dim=256, n_layer=7)
    return {"dense": GPT(dense).eval(), "mamba": Mamba(ssm).eval()}


def state_bytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for t in (*cache.k, *cache.v))


@torch.inference_mode()
def decode(model, context: int, steps: int, fast: bool = True, seed: int = 0) -> dict:
    """Prefill `context` random tokens (made up), then `steps` greedy tokens one at a time;
    the median seconds per new token and the decode state's bytes. fast=False: the dense model
    through its plain cached forward instead of CpuDecoder (the same per-call machinery as
    Mamba's forward)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.cfg.vocab_size, (context,), generator=g)
    cache = model.new_cache(1, context + steps)
    dense = isinstance(model, GPT) and fast
    decoder = CpuDecoder(model) if dense else None
    t0 = time.perf_counter()
    if dense:
        logits = decoder.prefill(ids, cache)
    else:
        logits = model(ids.view(1, -1), cache, 0, last_only=True).view(-1)
    prefill_s = time.perf_counter() - t0
    times = []
    for i in range(steps):
        nxt = logits.argmax().view(1)
        t0 = time.perf_counter()
        if dense:
            logits = decoder.step(nxt, cache, context + i)
        else:
            logits = model(nxt.view(1, 1), cache, context + i).view(-1)
        times.append(time.perf_counter() - t0)
    per_token = median(times)
    return {
        "context": context,
        "tokens_per_s": 1.0 / per_token,
        "ms_per_token": 1e3 * per_token,
        "state_mb": state_bytes(cache) / 2**20,
        "prefill_s": prefill_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[256, 2048, 8192])
    ap.add_argument("--steps", type=int, default=64, help="new tokens timed per context")
    ap.add_argument("--vocab", type=int, default=8192)
    args = ap.parse_args()
    env = environment(torch.device("cpu"), torch.float32)
    built = models(args.vocab, max(args.contexts) + args.steps)
    rows, results = [], {}
    variants = [("dense", "dense", True), ("dense-forward", "dense", False)]
    variants += [("mamba", "mamba", True)]
    for name, which, fast in variants:
        model = built[which]
        params = num_params(model)
        results[name] = {"params": params, "runs": []}
        for context in args.contexts:
            r = decode(model, context, args.steps, fast)
            results[name]["runs"].append(r)
            rows.append([name, f"{params / 1e6:.2f}M", context, f"{r['tokens_per_s']:.1f}",
                         f"{r['ms_per_token']:.2f}", f"{r['state_mb']:.3f}",
                         f"{r['prefill_s']:.2f}"])  # fmt: skip
            print(f"done {name} @ {context}", flush=True)
    header = ["model", "params", "context", "tok/s", "ms/token", "state MB", "prefill s"]
    print_table(header, rows)
    print_json("mamba_decode", env, steps=args.steps, threads=torch.get_num_threads(), **results)


if __name__ == "__main__":
    main()
