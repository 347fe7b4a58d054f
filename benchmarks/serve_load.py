"""Load on `lmforge serve`: N concurrent streaming chat clients, aggregate throughput and latency.

Regime: a small model served to several users at once from a CPU. The server runs as its own
process (as in production); each client sends the same number of streaming chat requests one
after another, each asking for a fixed number of tokens (greedy, ignoring end-of-turn so every
answer has the same length). For N = 1, 4, 16 clients it prints aggregate output tokens/s, time
to first token and the gap between tokens (p50/p99), and errors; the ratio of the 16-client
throughput to the 1-client throughput is the gain continuous batching buys.

    python benchmarks/serve_load.py --model runs/tiny/sft/model
    python benchmarks/serve_load.py --model DIR --clients 1,4,16 --requests 3 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx

PROMPTS = [
    "Tell me a story about a dragon.",
    "What is the capital of France?",
    "请介绍一下你自己。",
    "Give three tips for staying healthy.",
    "Write a poem about the sea.",
    "把这句话翻译成英文：我喜欢读书。",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


async def one_request(client: httpx.AsyncClient, i: int, args) -> dict:
    body = {
        "model": args.model_name,
        "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    t0 = time.perf_counter()
    stamps, tokens = [], 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
    if not stamps:
        return {"error": "no content"}
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"ttft": stamps[0] - t0, "gaps": gaps, "tokens": tokens, "seconds": stamps[-1] - t0}


async def run_level(base: str, n_clients: int, args) -> dict:
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:

        async def client_loop(c: int) -> list[dict]:
            return [
                await one_request(client, c * args.requests + k, args) for k in range(args.requests)
            ]

        t0 = time.perf_counter()
        results = [
            r for rs in await asyncio.gather(*map(client_loop, range(n_clients))) for r in rs
        ]
        wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    gaps = [g for r in ok for g in r["gaps"]]
    return {
        "clients": n_clients,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "error_examples": [r["error"] for r in results if "error" in r][:3],
        "tokens": sum(r["tokens"] for r in ok),
        "tok_s": sum(r["tokens"] for r in ok) / wall,
        "ttft_p50": pct([r["ttft"] for r in ok], 0.5),
        "ttft_p99": pct([r["ttft"] for r in ok], 0.99),
        "gap_p50": pct(gaps, 0.5),
        "gap_p99": pct(gaps, 0.99),
        "wall_s": wall,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="runs/tiny/sft/model", help="model directory to serve")
    p.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    p.add_argument("--requests", type=int, default=2, help="requests per client per level")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens per answer")
    p.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    p.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    p.add_argument(
        "--serve-args",
        default="",
        help="extra arguments for `lmforge serve`, e.g. '--no-batch-invariance'",
    )
    args = p.parse_args()
    args.model_name = "bench"
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, "-m", "lmforge", "serve", args.model, "--port", str(port)]
    cmd += ["--max-batch", str(args.max_batch), "--model-name", args.model_name]
    cmd += args.serve_args.split()
    log = tempfile.TemporaryFile("w+")  # the server logs a line per request: never a full pipe
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None:
                log.seek(0)
                sys.exit(f"the server exited:\n{log.read()[-3000:]}")
            time.sleep(0.2)
        asyncio.run(run_level(base, 1, argparse.Namespace(**{**vars(args), "requests": 1})))
        levels = [asyncio.run(run_level(base, int(n), args)) for n in args.clients.split(",")]
    finally:
        server.terminate()
        server.wait(30)
    print(
        f"lmforge serve {args.model}: --max-batch {args.max_batch} {args.serve_args}, "
        f"{args.threads} threads; "
        f"{args.requests} streaming requests per client of {args.max_tokens} tokens, greedy"
    )
    header = ["clients", "requests", "errors", "tokens/s", "TTFT p50", "TTFT p99"]
    header += ["token gap p50", "token gap p99"]
    print("  ".join(f"{h:>13}" for h in header))
    for r in levels:
        cells = [r["clients"], r["requests"], r["errors"], f"{r['tok_s']:,.1f}"]
        cells += [f"{1000 * r[k]:.0f} ms" for k in ("ttft_p50", "ttft_p99", "gap_p50", "gap_p99")]
        print("  ".join(f"{c!s:>13}" for c in cells))
        for e in r["error_examples"]:
            print(f"  error: {e}")
    by = {r["clients"]: r for r in levels}
    if 1 in by and len(by) > 1:
        top = max(by)
        print(
            f"aggregate throughput at {top} clients / 1 client: {by[top]['tok_s'] / by[1]['tok_s']:.2f}x"
        )
    print(json.dumps({"bench": "serve_load", "model": args.model, "levels": levels}))


if __name__ == "__main__":
    main()
