"""GGUF parity: does llama.cpp, given our exported file, tokenize and generate as lmforge does?

Regime: correctness, not speed. A trained checkpoint is exported to GGUF (f32 and q8_0) and
opened by llama.cpp through llama-cpp-python, which lives in its own environment (it is not an
lmforge dependency): this script runs there in a subprocess, the `--probe` half below, which
imports nothing of lmforge. Reported per outtype:
- tokenization: documents of the bundled English and Chinese corpora (and the prompts) whose
  llama.cpp token ids, BOS included, equal ours;
- greedy decoding: from the same prompt ids, llama.cpp's argmax tokens against
  `lmforge.infer.generate(temperature=0)`; matched = the common prefix, out of ours.
f32 should match token for token (differences are float summation order deciding near-ties);
q8_0 may drift after a few tokens where two logits are close.

    python benchmarks/gguf_llamacpp.py --llama-python /tmp/llamaenv/bin/python
    python benchmarks/gguf_llamacpp.py --model runs/tiny/sft/model --new-tokens 64

The same subprocess half also times llama.cpp's decoding and runs its quantizer for
`bench_decode.py --model-dir` (the internal `--decode` and `--quantize` modes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "Once upon a time, there was a little girl named",
    "The capital of France is",
    "One day, Tom went to the park with his dog. He",
    "从前有一座山，山上有一座庙，",
    "中国的首都是",
    "宝玉听了，忙笑道",
]


def probe(args: dict) -> dict:
    """The llama.cpp side (runs in the llama-cpp-python environment)."""
    import numpy as np
    from llama_cpp import Llama

    out = {}
    for path in args["models"]:
        llm = Llama(
            model_path=path, n_ctx=args["n_ctx"], logits_all=True, n_threads=2, verbose=False
        )
        tokens = [llm.tokenize(t.encode(), add_bos=True, special=False) for t in args["texts"]]
        greedy = []
        for ids in args["prompt_ids"]:
            llm.reset()
            llm.eval(ids)
            new = []
            while len(new) < args["new_tokens"] and llm.n_tokens < args["n_ctx"]:
                nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                new.append(nxt)
                if nxt == llm.token_eos():
                    break
                llm.eval([nxt])
            greedy.append(new)
        out[path] = {"tokens": tokens, "greedy": greedy}
    return out


def decode_probe(args: dict) -> dict:
    """Time one greedy batch-1 generation of args["new_tokens"] tokens from args["prompt_ids"]
    with llama.cpp's own sampler (the llama.cpp side of `bench_decode.py --model-dir`; runs in
    the llama-cpp-python environment). The prompt's prefill is timed too, as on lmforge's side;
    EOS does not stop it, so every side makes the same number of tokens."""
    import llama_cpp.llama_cpp as lib  # the bindings module Llama() reads its defaults from
    from llama_cpp import Llama

    if not args.get("extra_bufts", True):
        # llama.cpp's extra weight buffers (repacked Q4_0/Q8_0, AMX int8 tiles) off: in this VM
        # the AMX path segfaults on the first quantized product. Llama() takes no option for it
        default = lib.llama_model_default_params

        def without_extra_bufts():
            params = default()
            params.use_extra_bufts = False
            return params

        lib.llama_model_default_params = without_extra_bufts
    threads = args["threads"]
    llm = Llama(
        model_path=args["model"],
        n_ctx=args["n_ctx"],
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )

    def run(n: int) -> list[int]:
        llm.reset()  # no prompt-prefix reuse from the previous run: prefill every time
        new = []
        for tok in llm.generate(args["prompt_ids"], temp=0.0, repeat_penalty=1.0):
            new.append(tok)
            if len(new) == n:
                return new
        return new

    run(args["warmup_tokens"])  # first-touch of the mapped weights, thread pool start-up
    t = time.perf_counter()
    tokens = run(args["new_tokens"])
    return {"seconds": time.perf_counter() - t, "tokens": tokens}


def quantize_gguf(src: str, dst: str, ftype: str) -> None:
    """llama.cpp's own quantizer (what its `llama-quantize` tool runs) on a GGUF: for the types
    our export does not write (q4_0). Runs in the llama-cpp-python environment."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
    params.nthread = 2
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)):
        sys.exit(f"llama.cpp could not quantize {src} to {ftype}")


def documents(n: int) -> list[tuple[str, str]]:
    """(source, text) for n documents (first 1500 characters) of each bundled en and zh corpus."""
    from lmforge.config import SourceConfig
    from lmforge.data.readers import iter_documents

    d = ROOT / "datasets"
    sources = [
        SourceConfig(path=str(d / "tinystories"), split_on="blank_line", max_docs=n),
        SourceConfig(path=str(d / "enwiki"), format="jsonl", max_docs=n),
        SourceConfig(path=str(d / "chinese" / "zhwiki_sample.jsonl.gz"), max_docs=n),
        SourceConfig(
            path=str(d / "chinese" / "novel_honglou_meng.txt.gz"),
            split_on="line",
            min_chars=600,
            max_docs=n,
        ),
    ]
    return [(s.name, doc[:1500]) for s in sources for doc in iter_documents(s)]


def uncapped_encoder(model_dir: str):
    """Our tokenizer with Han runs left whole (`\\p{Han}+` for `\\p{Han}{1,16}`), as cl100k's
    split, the one llama.cpp applies, leaves them: does the cap explain every difference?"""
    import tokenizers

    spec = json.loads((Path(model_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    for step in spec["pre_tokenizer"].get("pretokenizers", []):
        if step["type"] == "Split":
            step["pattern"]["Regex"] = step["pattern"]["Regex"].replace("{1,16}", "+")
    tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
    return lambda text: tok.encode(text, add_special_tokens=False).ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "runs/tiny-p7/pretrain/model"))
    ap.add_argument(
        "--llama-python",
        default=os.environ.get("LMFORGE_LLAMA_CPP_PYTHON", "/tmp/llamaenv/bin/python"),
        help="python of an environment with llama-cpp-python",
    )
    ap.add_argument("--outtypes", default="f32,q8_0")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--docs", type=int, default=50, help="documents per corpus to tokenize")
    ap.add_argument("--probe", help=argparse.SUPPRESS)  # internal: the llama.cpp side
    ap.add_argument("--decode", help=argparse.SUPPRESS)  # internal: time one decode (llama.cpp)
    ap.add_argument("--quantize", nargs=3, help=argparse.SUPPRESS)  # internal: SRC DST FTYPE
    args = ap.parse_args()
    if args.probe:
        print(json.dumps(probe(json.loads(Path(args.probe).read_text()))))
        return
    if args.decode:
        print(json.dumps(decode_probe(json.loads(Path(args.decode).read_text()))))
        return
    if args.quantize:
        quantize_gguf(*args.quantize)
        return

    import torch

    from lmforge.compress.gguf import export_gguf
    from lmforge.infer.generate import generate
    from lmforge.model.checkpoint import load_model
    from lmforge.tokenizer import Tokenizer

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import environment

    model, tok = load_model(args.model), Tokenizer.load(args.model)
    docs = documents(args.docs)
    texts = PROMPTS + [text for _, text in docs]
    prompt_ids = [[tok.bos_id] + tok.encode(p) for p in PROMPTS]
    ours_greedy = [
        list(generate(model, ids, args.new_tokens, temperature=0.0, stop_ids=(tok.eos_id,)))
        for ids in prompt_ids
    ]
    ours_tokens = [[tok.bos_id] + tok.encode(t) for t in texts]

    with tempfile.TemporaryDirectory() as tmp:
        files = {
            t: str(export_gguf(args.model, Path(tmp) / f"{t}.gguf", t))
            for t in args.outtypes.split(",")
        }
        request = Path(tmp) / "request.json"
        request.write_text(
            json.dumps(
                {
                    "models": list(files.values()),
                    "n_ctx": model.cfg.max_seq_len,
                    "texts": texts,
                    "prompt_ids": prompt_ids,
                    "new_tokens": args.new_tokens,
                }
            )
        )
        r = subprocess.run(
            [args.llama_python, __file__, "--probe", str(request)], capture_output=True, text=True
        )
        if r.returncode:
            sys.exit(f"llama.cpp side failed:\n{r.stderr[-3000:]}")
        theirs = json.loads(r.stdout.splitlines()[-1])

    # --- tokenization: the same vocabulary in every file, so the first file tells
    their_tokens = theirs[next(iter(files.values()))]["tokens"]
    uncapped = uncapped_encoder(args.model)
    print(f"model {args.model}\n\ntokenization, BOS included: llama.cpp = ours")
    print(f"  {'texts':<22} {'identical':>10} {'tokens ours':>12} {'llama.cpp':>10}")
    groups = [("prompts", range(len(PROMPTS)))]
    for name in dict.fromkeys(n for n, _ in docs):
        groups.append((name, [len(PROMPTS) + i for i, (n, _) in enumerate(docs) if n == name]))
    for name, idx in groups:
        same = sum(their_tokens[i] == ours_tokens[i] for i in idx)
        n_ours = sum(len(ours_tokens[i]) for i in idx)
        n_theirs = sum(len(their_tokens[i]) for i in idx)
        print(f"  {name:<22} {same:>5}/{len(idx):<4} {n_ours:>12} {n_theirs:>10}")
    differ = [i for i, (a, b) in enumerate(zip(their_tokens, ours_tokens)) if a != b]
    explained = sum(their_tokens[i] == [tok.bos_id] + uncapped(texts[i]) for i in differ)
    print(
        f"  differences that Han runs left whole (no 16-character cap) explain: "
        f"{explained}/{len(differ)}"
    )
    rows = [
        {
            "tokenization_identical": f"{len(texts) - len(differ)}/{len(texts)}",
            "explained_by_han_cap": f"{explained}/{len(differ)}",
        }
    ]

    # --- greedy decoding from our prompt ids
    for outtype, path in files.items():
        print(f"\n{outtype}: greedy, {'matched':>9}  llama.cpp continuation")
        matched = total = 0
        for p, a, b in zip(PROMPTS, ours_greedy, theirs[path]["greedy"]):
            n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            matched, total = matched + n, total + len(a)
            print(f"  {p[:38]:<40} {n:>4}/{len(a):<4}  {tok.decode(b)[:60]!r}")
        print(f"  greedy tokens matched: {matched}/{total}")
        rows.append({"outtype": outtype, "greedy_tokens_matched": f"{matched}/{total}"})
    env = environment(torch.device("cpu"), torch.float32)
    version = subprocess.run(
        [args.llama_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    print(json.dumps({"results": rows, "llama_cpp_python": version, **env}))


if __name__ == "__main__":
    main()
