"""Batch-1 greedy decoding speed: `lmforge.infer.generate` and the serving engine
(`lmforge.infer.engine`, one request) vs. transformers' `generate`, on the same weights, in one
process.

Regime: one user chatting with a model on a CPU. Each new token reads every weight once (all
parameters except the input embedding table, whose one row per token is noise), so decoding is
memory-bandwidth-bound: tokens/s can never exceed bandwidth / bytes of weights. The table puts
each side's tokens/s against that bound, measured here with `perf.memory_bandwidth`: what is
missing from 100% is per-token overhead (Python, dispatch, small kernels) and GEMV inefficiency.
It also checks that both sides produce the same greedy tokens; on random weights the top two
logits can be close enough for fp32 summation order to flip one, so a divergence is reported
with its position rather than failing the run.

    python benchmarks/bench_decode.py                  # both models, 2 threads, 256 new tokens
    python benchmarks/bench_decode.py --models small --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from common import environment, median, print_json, print_table, quiet_transformers

from lmforge.config import ModelConfig
from lmforge.infer.engine import Engine, SamplingParams
from lmforge.infer.generate import generate
from lmforge.model.checkpoint import save_model
from lmforge.model.transformer import GPT, num_params
from lmforge.perf import memory_bandwidth

MODELS = {
    # the tiny recipe's scale (as in bench_train_throughput's "small"): 6 x 384, vocab 8192, tied
    "small": dict(vocab_size=8192, dim=384, n_layer=6, n_head=6, max_seq_len=512),
    # recipes/tiny-cpu.yaml's model as of this writing: 4 x 256, vocab 8192, tied (5.3M)
    "recipe": dict(vocab_size=8192, dim=256, n_layer=4, n_head=4, max_seq_len=512),
    # a Llama-shaped 110M (the size of GPT-2 small / TinyStories-110M): 12 x 768, untied
    "110m": dict(
        vocab_size=32000,
        dim=768,
        n_layer=12,
        n_head=12,
        ffn_dim=2048,
        max_seq_len=512,
        tie_embeddings=False,
    ),
}


def build_pair(cfg: ModelConfig):
    """Ours with random weights, and transformers' model opened from our saved checkpoint."""
    from transformers import GenerationConfig, LlamaForCausalLM

    torch.manual_seed(0)
    ours = GPT(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        save_model(ours, tmp)
        theirs = LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    # random weights emit EOS at random; neither side may stop early, so HF gets no eos id
    # (ours gets no stop_ids) and none of the sampling defaults our checkpoints carry
    theirs.generation_config = GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=None)
    return ours, theirs


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b)) if x != y),
        None if len(a) == len(b) else min(len(a), len(b)),
    )


def bench_model(name: str, args) -> dict:
    cfg = ModelConfig(**MODELS[name])
    ours, theirs = build_pair(cfg)
    prompt = torch.randint(
        0, cfg.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(1)
    )
    n = args.new_tokens

    def run_ours(model) -> list[int]:
        return list(generate(model, prompt[0].tolist(), max_new_tokens=n, temperature=0.0))

    def run_theirs() -> list[int]:
        out = theirs.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n
        )
        return out[0, prompt.shape[1] :].tolist()

    def run_engine(invariant: bool) -> list[int]:
        # the serving engine with one request; batch-invariant, its step runs all its slots
        engine = Engine(ours, None, max_batch=args.engine_batch, batch_invariant=invariant)
        req = engine.submit(prompt[0].tolist(), SamplingParams(max_tokens=n))
        engine.run_until_done()
        return req.output_ids

    sides = {
        "ours": lambda: run_ours(ours),
        "transformers": run_theirs,
        "engine": lambda: run_engine(True),
        "engine_fast": lambda: run_engine(False),
    }
    if args.compile:
        # generate() takes a compiled module as is; dynamic shapes, as the cache grows every step
        compiled = torch.compile(ours, dynamic=True)
        sides["compiled"] = lambda: run_ours(compiled)
    tokens, first = {}, {}
    for side, fn in sides.items():  # the first run is the warm-up (and, compiled, the compilation)
        t = time.perf_counter()
        tokens[side] = fn()
        first[side] = time.perf_counter() - t
    times = {side: [] for side in sides}
    for r in range(args.repeats):
        for side in list(sides) if r % 2 == 0 else list(sides)[::-1]:
            t = time.perf_counter()
            sides[side]()
            times[side].append(time.perf_counter() - t)
    out = {
        "model": name,
        "params": num_params(ours),
        "bytes_per_token": 4 * num_params(ours, non_embedding=True),
        "prompt_len": args.prompt_len,
        "new_tokens": n,
        **{f"{side}_tok_s": n / median(ts) for side, ts in times.items()},
        "ratio": median(times["transformers"]) / median(times["ours"]),
        "same_tokens": tokens["ours"] == tokens["transformers"],
        "engine_ratio": median(times["transformers"]) / median(times["engine"]),
        "engine_fast_ratio": median(times["transformers"]) / median(times["engine_fast"]),
        "engine_same_tokens": tokens["engine"] == tokens["engine_fast"] == tokens["transformers"],
        "first_divergence": first_divergence(tokens["ours"], tokens["transformers"]),
    }
    if args.compile:
        out["compile_s"] = first["compiled"] - median(times["compiled"])
        out["compiled_same_tokens"] = tokens["compiled"] == tokens["ours"]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models", default="small,110m", help=f"comma-separated, from {', '.join(MODELS)}"
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="timed generations per side (median reported)"
    )
    p.add_argument("--new-tokens", type=int, default=256, help="greedy tokens per generation")
    p.add_argument(
        "--prompt-len", type=int, default=16, help="random prompt tokens (prefill is timed too)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument(
        "--engine-batch",
        type=int,
        default=8,
        help="slots of the engine (one request runs): 'engine' is batch-invariant (its step "
        "runs every slot), 'engine fast' runs only the busy one",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time ours under torch.compile (and its compile time)",
    )
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    quiet_transformers()
    load_before = os.getloadavg()[0]
    bandwidth = memory_bandwidth("cpu")
    results = [bench_model(name, args) for name in args.models.split(",")]
    bandwidth = max(bandwidth, memory_bandwidth("cpu"))  # best of before and after
    sides = ["ours", "transformers", "engine", "engine_fast"]
    sides += ["compiled"] if args.compile else []
    for r in results:
        r["max_tok_s"] = bandwidth / r["bytes_per_token"]
        for side in sides:
            r[f"{side}_of_bound"] = r[f"{side}_tok_s"] / r["max_tok_s"]

    print(
        f"memory bandwidth {bandwidth / 1e9:.1f} GB/s, {torch.get_num_threads()} threads, cpu, "
        f"load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after"
    )
    header = [
        "model",
        "params",
        "MB/token",
        "bound tok/s",
        "ours tok/s",
        "HF tok/s",
        "ours/HF",
        "ours/bound",
        "HF/bound",
        "same tokens",
        "engine tok/s",
        "engine/HF",
        "engine fast tok/s",
        "fast/HF",
    ]
    rows = [
        [
            r["model"],
            f"{r['params'] / 1e6:.1f}M",
            f"{r['bytes_per_token'] / 1e6:.0f}",
            r["max_tok_s"],
            r["ours_tok_s"],
            r["transformers_tok_s"],
            f"{r['ratio']:.2f}x",
            f"{100 * r['ours_of_bound']:.0f}%",
            f"{100 * r['transformers_of_bound']:.0f}%",
            "yes" if r["same_tokens"] else f"no, from token {r['first_divergence']}",
            r["engine_tok_s"],
            f"{r['engine_ratio']:.2f}x",
            r["engine_fast_tok_s"],
            f"{r['engine_fast_ratio']:.2f}x",
        ]
        for r in results
    ]
    if args.compile:
        header += ["compiled tok/s", "compiled/bound", "compile s"]
        for row, r in zip(rows, results):
            row += [
                r["compiled_tok_s"],
                f"{100 * r['compiled_of_bound']:.0f}%",
                f"{r['compile_s']:.0f}",
            ]
    print_table(header, rows)
    print_json(
        "decode",
        environment(torch.device("cpu"), torch.float32),
        memory_bandwidth=bandwidth,
        results=results,
    )


if __name__ == "__main__":
    main()
