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

With `--model-dir DIR` (a real model, e.g. the imported SmolLM2) it compares precisions instead:
lmforge's `generate` on the float model and on its int8 and int4 (`lmforge quantize` methods,
saved and reloaded as the CLI would), transformers on the float model, and llama.cpp (through
llama-cpp-python, in its own environment and a subprocess per run, so a crash is reported, not
fatal) on our f32 and q8_0 GGUF exports, a q4_0 made from the f32 export by llama.cpp's own
quantizer (our export writes no 4-bit type) and any original GGUF passed with --gguf. The prompt
is a chat turn; no side stops at EOS, so all make the same number of tokens.

    python benchmarks/bench_decode.py --model-dir ~/.cache/lmforge/models/smollm2-135m-instruct \
        --gguf ~/.cache/lmforge/gguf/SmolLM2-135M-Instruct.Q4_1.gguf --llama-python PY
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

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


# --------------------------------------------------------------------------- a real model

LLAMA_SCRIPT = Path(__file__).resolve().parent / "gguf_llamacpp.py"
PROMPT = "Write a story about a robot who learns to paint, with a happy ending."
# each quantized side's counterpart in llama.cpp ("ratio at the same precision")
SAME_PRECISION = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}


def model_bytes_per_token(model) -> int:
    """Weight bytes one decode step reads: every parameter and buffer once (tied ones once),
    less the RoPE tables and an untied input embedding, of which a step reads one row."""
    from lmforge.compress.quantize import weight_bytes

    n = weight_bytes(model) - model.rope_cos.nbytes - model.rope_sin.nbytes
    if not model.cfg.tie_embeddings:
        n -= sum(t.nbytes for t in model.tok_emb.state_dict().values())
    return n


def gguf_bytes_per_token(path: Path) -> int:
    """The same for a GGUF file: its tensors, less token_embd when a separate output.weight
    exists (a tied model's token_embd is also its output head, read whole every step)."""
    from gguf import GGUFReader

    sizes = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}
    if "output.weight" in sizes:
        sizes.pop("token_embd.weight")
    return sum(sizes.values())


def quantized_copy(model_dir: Path, method: str, tmp: Path):
    """`lmforge quantize`'s method on the float model, saved and loaded back as `lmforge
    generate` would load it."""
    from lmforge.compress.quantize import quantize_model
    from lmforge.config import QuantizeConfig
    from lmforge.model.checkpoint import save_quantized
    from lmforge.model.load import load

    model, tok = load(model_dir)
    spec = quantize_model(model, QuantizeConfig(method=method, eval_tokens=0))
    save_quantized(model, spec, tmp / method, model_dir, tok.pad_id)
    return load(tmp / method)[0]


def llama_run(args, request: dict, tmp: Path) -> dict:
    """One timed llama.cpp generation in a fresh subprocess: its result, or {"error": ...}
    (a segfault is rc -11) so that one crashing file does not end the benchmark."""
    path = tmp / "request.json"
    path.write_text(json.dumps(request))
    cmd = [args.llama_python, str(LLAMA_SCRIPT), "--decode", str(path)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.llama_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no answer within {args.llama_timeout} s"}
    if r.returncode:
        tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit status {r.returncode}: {tail[:200]}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def llama_preflight(args, request: dict, tmp: Path) -> str | None:
    """A 4-token run of a llama.cpp side before timing it. If it fails with llama.cpp's extra
    weight buffers, retry without them (request["extra_bufts"] = False); if that fails too,
    request["error"] says why. Returns what happened, or None when the defaults work."""
    short = {**request, "new_tokens": 4, "warmup_tokens": 1}
    first = llama_run(args, short, tmp)
    if "error" not in first:
        return None
    request["extra_bufts"] = False
    second = llama_run(args, {**short, "extra_bufts": False}, tmp)
    if "error" in second:
        request["error"] = f"failed: {first['error']}; without extra buffers: {second['error']}"
        return request["error"]
    return f"with llama.cpp's extra buffer types: {first['error']}; timed without them"


def gguf_files(args, model_dir: Path, tmp: Path) -> dict[str, Path]:
    """llama.cpp's files: our f32 and q8_0 exports, q4_0 quantized by llama.cpp from our f32
    export (when it can), and the original GGUFs passed with --gguf."""
    from lmforge.compress.gguf import export_gguf

    files = {t: export_gguf(model_dir, tmp / f"{t}.gguf", t) for t in ("f32", "q8_0")}
    q4 = tmp / "q4_0.gguf"
    cmd = [args.llama_python, str(LLAMA_SCRIPT), "--quantize", str(files["f32"]), str(q4), "q4_0"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode == 0 and q4.is_file():
        files["q4_0"] = q4
    else:
        print(f"llama.cpp could not make q4_0 (exit {r.returncode}): {r.stderr.strip()[-300:]}")
    for g in args.gguf:
        files[f"{Path(g).stem.rsplit('.', 1)[-1]} (original)"] = Path(g).expanduser()
    return files


@torch.no_grad()
def teacher_forced_agreement(model, prompt: list[int], reference: list[int]) -> float:
    """Fraction of positions where model's argmax, fed the reference continuation (not its own),
    is the reference token: a measure of a quantized model's greedy choices that one early
    near-tie cannot derail, unlike the common prefix of free-running generations."""
    ids = torch.tensor([prompt + reference[:-1]])
    pred = model(ids)[0, len(prompt) - 1 :].argmax(-1)
    return (pred == torch.tensor(reference)).float().mean().item()


def bench_real(args) -> None:
    """Every side on one real model: tokens/s, ratios, bandwidth use, greedy agreement."""
    from transformers import GenerationConfig, LlamaForCausalLM

    from lmforge.infer.chat import chat_prompt_ids
    from lmforge.model.load import load

    model_dir = Path(args.model_dir).expanduser()
    # torch, our kernels and llama.cpp all use OpenMP, whose threads spin while they wait by
    # default; on cores shared with other jobs that spinning dominates (see docs/benchmarks.md)
    omp_wait = os.environ.get("OMP_WAIT_POLICY", "(unset)")
    n = args.new_tokens
    fp32, tok = load(model_dir)
    prompt = chat_prompt_ids(tok, [{"role": "user", "content": args.prompt}])
    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf.generation_config = GenerationConfig(eos_token_id=None)  # no side stops early
    x = torch.tensor([prompt])
    tmp_dir = tempfile.TemporaryDirectory()
    tmp = Path(tmp_dir.name)
    ours = {"fp32": fp32, **{m: quantized_copy(model_dir, m, tmp) for m in ("int8", "int4")}}
    files = gguf_files(args, model_dir, tmp)

    def run_ours(model) -> list[int]:
        return list(generate(model, prompt, max_new_tokens=n, temperature=0.0))

    def run_hf() -> list[int]:
        out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n)
        return out[0, len(prompt) :].tolist()

    sides = {f"lmforge {k}": (lambda m=m: run_ours(m)) for k, m in ours.items()}
    sides["transformers fp32"] = run_hf
    nbytes = {f"lmforge {k}": model_bytes_per_token(m) for k, m in ours.items()}
    nbytes["transformers fp32"] = nbytes["lmforge fp32"]
    notes = {}  # side -> what went wrong before it could be timed
    for k, path in files.items():
        request = {
            "model": str(path),
            "prompt_ids": prompt,
            "new_tokens": n,
            "warmup_tokens": 8,
            "n_ctx": len(prompt) + n + 16,
            "threads": args.threads,
        }
        side = f"llama.cpp {k}"
        nbytes[side] = gguf_bytes_per_token(path)
        problem = llama_preflight(args, request, tmp)
        if problem:
            notes[side] = problem
        if "error" not in request:
            sides[side] = lambda r=request: llama_run(args, r, tmp)

    bandwidth = memory_bandwidth("cpu")
    load_before = os.getloadavg()[0]
    tokens, times = {}, {s: [] for s in sides}
    errors = {s: notes[s] for s in nbytes if s not in sides}
    # warm-up of the in-process sides (first-use kernel builds, weight relayout); llama.cpp
    # warms up in each of its processes
    for model in ours.values():
        list(generate(model, prompt, max_new_tokens=8, temperature=0.0))
    hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=8)
    for r in range(args.repeats):
        for side in list(sides) if r % 2 == 0 else list(sides)[::-1]:
            if side in errors:
                continue
            t = time.perf_counter()
            out = sides[side]()
            seconds = time.perf_counter() - t
            if isinstance(out, dict):  # llama.cpp: its own timing, without load and warm-up
                if "error" in out:
                    errors[side] = out["error"]
                    continue
                out, seconds = out["tokens"], out["seconds"]
            tokens[side] = out
            times[side].append(seconds)
            print(f"  repeat {r + 1}/{args.repeats} {side}: {n / seconds:.1f} tokens/s", flush=True)
    bandwidth = max(bandwidth, memory_bandwidth("cpu"))  # best of before and after
    ref = tokens["lmforge fp32"]
    forced = {
        f"lmforge {k}": teacher_forced_agreement(m, prompt, ref)
        for k, m in ours.items()
        if k != "fp32"
    }
    results = []
    for side in nbytes:
        row = {"side": side, "bytes_per_token": nbytes[side]}
        if side in errors:
            results.append({**row, "error": errors[side]})
            continue
        tok_s = n / median(times[side])
        row.update(tok_s=tok_s, of_bound=tok_s * nbytes[side] / bandwidth)
        row["same_as_fp32"] = first_divergence(tokens[side], ref)  # None: all n tokens equal
        if side in forced:
            row["teacher_forced_agreement"] = forced[side]
        results.append(row)
    by = {r["side"]: r for r in results}
    for r in results:
        if "tok_s" not in r:
            continue
        r["vs_lmforge_fp32"] = r["tok_s"] / by["lmforge fp32"]["tok_s"]
        peer = by.get(f"llama.cpp {SAME_PRECISION.get(r['side'].split()[-1], '')}", {})
        if r["side"].startswith("lmforge") and "tok_s" in peer:
            r["vs_llama_cpp"] = r["tok_s"] / peer["tok_s"]

    print(
        f"\n{model_dir.name}: prompt {len(prompt)} tokens, {n} greedy tokens, "
        f"{args.repeats} repeats (median), {args.threads} threads; memory bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s; load average {load_before:.1f} before / "
        f"{os.getloadavg()[0]:.1f} after; OMP_WAIT_POLICY={omp_wait}"
    )
    header = ["side", "MB/token", "tok/s", "/ lmforge fp32", "/ llama.cpp", "of bound", "= fp32"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["side"], f"{r['bytes_per_token'] / 1e6:.0f}", "failed"] + [""] * 4)
            continue
        agree = "all" if r["same_as_fp32"] is None else f"{r['same_as_fp32']} tokens"
        if "teacher_forced_agreement" in r:
            agree += f" ({100 * r['teacher_forced_agreement']:.1f}% forced)"
        rows.append(
            [
                r["side"],
                f"{r['bytes_per_token'] / 1e6:.0f}",
                r["tok_s"],
                f"{r['vs_lmforge_fp32']:.2f}x",
                f"{r['vs_llama_cpp']:.2f}x" if "vs_llama_cpp" in r else "",
                f"{100 * r['of_bound']:.0f}%",
                agree,
            ]
        )
    print_table(header, rows)
    for side, note in {**notes, **errors}.items():
        print(f"{side}: {note}")
    print(
        "= fp32: greedy tokens equal to lmforge fp32's before the first difference; forced: "
        "top-1 agreement when fed fp32's tokens"
    )
    version = subprocess.run(
        [args.llama_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    print_json(
        "decode_real",
        environment(torch.device("cpu"), torch.float32),
        omp_wait_policy=omp_wait,
        notes=notes,
        model=str(model_dir),
        llama_cpp_python=version,
        prompt_tokens=len(prompt),
        new_tokens=n,
        memory_bandwidth=bandwidth,
        results=results,
    )
    tmp_dir.cleanup()


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
    p.add_argument(
        "--model-dir",
        help="a real model directory: compare its precisions and llama.cpp (see the docstring)",
    )
    p.add_argument("--prompt", default=PROMPT, help="--model-dir: the user turn")
    p.add_argument(
        "--gguf", action="append", default=[], help="--model-dir: an original GGUF (repeatable)"
    )
    p.add_argument(
        "--llama-python",
        default=os.environ.get("LMFORGE_LLAMA_CPP_PYTHON", "/tmp/llvenv/bin/python"),
        help="--model-dir: python of an environment with llama-cpp-python",
    )
    p.add_argument("--llama-timeout", type=int, default=300, help="seconds per llama.cpp run")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    quiet_transformers()
    if args.model_dir:
        bench_real(args)
        return
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
