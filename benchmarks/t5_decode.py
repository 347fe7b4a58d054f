"""T5's cached greedy decoding against recomputing the prefix each step (model/t5.py).

A random model of t5-v1_1-small's shape (d_model 512, 8 encoder + 8 decoder layers, 6 heads of
64, d_ff 1024, vocab 32128; torch.manual_seed(0)), one random 128-token input, greedy for 64
new tokens, timed once each way (n = 1: read the ratio, not the decimals).

    OMP_NUM_THREADS=1 python benchmarks/t5_decode.py
"""

from __future__ import annotations

import time

import torch

from lmforge.model.t5 import T5, T5Config


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=32128, dim=512, d_kv=64, ffn_dim=1024, n_layer=8,
                   n_decoder_layer=8, n_head=6)  # fmt: skip
    model = T5(cfg).eval()
    idx = torch.randint(2, 32000, (1, 128))
    outs = {}
    for cache in (True, False):
        t = time.perf_counter()
        outs[cache] = model.generate_greedy(idx, 64, use_cache=cache)
        print(
            f"use_cache={cache}: {outs[cache].shape[1]} new tokens in {time.perf_counter() - t:.2f} s"
        )
    print("same tokens:", torch.equal(outs[True], outs[False]))


if __name__ == "__main__":
    main()
