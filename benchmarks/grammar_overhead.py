"""What a JSON-schema grammar costs on the CPU, for each candidate library, with SmolLM2's
tokenizer (49,152 tokens): the time to compile a schema into a matcher, and the per-token time
to compute the allowed-token mask and advance the matcher by the sampled token.

Why these numbers: constrained decoding adds the mask to every decode step, so the per-token
cost is paid on top of the forward pass (SmolLM2-135M decodes at ~1.1 ms/token... ~870
tokens/s on 2 threads), and compile time is paid once per request before its first token.

Each matcher is driven by a seeded random walk over its own allowed tokens (a stand-in for a
model's choices, made up for this benchmark), 200 tokens at most per schema.

    pip install llguidance xgrammar outlines-core   # candidates (xgrammar also needs torch)
    OMP_NUM_THREADS=2 python benchmarks/grammar_overhead.py [--tokenizer DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import time
from pathlib import Path

import torch

SCHEMAS = {  # made-up schemas of growing size
    "flat": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    },
    "enum+array": {
        "type": "object",
        "properties": {
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {"type": "array", "items": {"type": "number"}, "maxItems": 5},
            "ok": {"type": "boolean"},
        },
        "required": ["unit", "days", "ok"],
    },
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"},
                    "email": {"type": "string"},
                    "tags": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["id", "email"],
            },
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string"},
                        "qty": {"type": "integer", "minimum": 1},
                        "price": {"type": "number"},
                    },
                    "required": ["sku", "qty"],
                },
            },
            "status": {"enum": ["open", "paid", "shipped"]},
        },
        "required": ["user", "items", "status"],
    },
    "any object": {"type": "object"},
}
STEPS = 200
CLOSERS: set[int] = set()  # ids whose text holds "}" or "]", and the stop token (set in main)


def walk(mask_fn, advance_fn, done_fn, V: int, seed: int) -> tuple[list[float], list[float]]:
    """Drive one matcher STEPS tokens (or until it ends); per-token mask and advance seconds.
    A token that could end the JSON is taken only 1 time in 20, so walks reach inside."""
    rng = random.Random(seed)
    masks, advances = [], []
    for _ in range(STEPS):
        if done_fn():
            break
        t = time.perf_counter()
        bitmask = mask_fn()  # (W,) int32, filled in place
        masks.append(time.perf_counter() - t)
        ids = unpack(bitmask, V).nonzero().flatten().tolist()
        if not ids:
            break
        tok = rng.choice(ids)
        if tok in CLOSERS and len(ids) > 1 and rng.random() > 0.05:
            tok = rng.choice([i for i in ids if i not in CLOSERS] or ids)
        t = time.perf_counter()
        advance_fn(tok)
        advances.append(time.perf_counter() - t)
    return masks, advances


def unpack(bitmask: torch.Tensor, V: int) -> torch.Tensor:
    """(W,) int32 bitmask -> (V,) bool (bit j of word i is token 32 i + j)."""
    bits = (bitmask[:, None] >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten()[:V].bool()


def bench_llguidance(tok_dir: Path, V: int, eos: int):
    import llguidance
    import llguidance.torch as lt

    t0 = time.perf_counter()
    tok = llguidance.LLTokenizer((tok_dir / "tokenizer.json").read_text(), n_vocab=V, eos_token=eos)
    out = {"(tokenizer)": (time.perf_counter() - t0, [], [])}  # once per process
    for name, schema in SCHEMAS.items():
        t = time.perf_counter()
        m = llguidance.LLMatcher(tok, llguidance.LLMatcher.grammar_from_json_schema(schema))
        compile_s = time.perf_counter() - t
        assert not m.is_error(), m.get_error()
        bm = lt.allocate_token_bitmask(1, V)

        def mask(m=m, bm=bm):
            lt.fill_next_token_bitmask(m, bm)
            return bm[0]

        out[name] = (compile_s, *walk(mask, m.consume_token, m.is_stopped, V, 0))
    return out


def bench_xgrammar(tok_dir: Path, V: int, eos: int):
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    t0 = time.perf_counter()
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"))
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=V, stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    out = {"(tokenizer)": (time.perf_counter() - t0, [], [])}  # once per process
    for name, schema in SCHEMAS.items():
        t = time.perf_counter()
        m = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(schema)))
        compile_s = time.perf_counter() - t
        bm = xgr.allocate_token_bitmask(1, V)

        def mask(m=m, bm=bm):
            m.fill_next_token_bitmask(bm)
            return bm[0]

        out[name] = (compile_s, *walk(mask, m.accept_token, m.is_terminated, V, 0))
    return out


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def bench_outlines(tok_dir: Path, V: int, eos: int):
    import outlines_core as oc

    t0 = time.perf_counter()
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    dec = _byte_decoder()
    specials = {t["id"] for t in spec["added_tokens"]}
    vocab: dict[bytes, list[int]] = {}
    for s, i in spec["model"]["vocab"].items():
        if i not in specials:
            vocab.setdefault(bytes(dec[c] for c in s), []).append(i)
    voc = oc.Vocabulary(eos, vocab)
    out = {"(tokenizer)": (time.perf_counter() - t0, [], [])}  # once per process
    for name, schema in SCHEMAS.items():
        t = time.perf_counter()
        regex = oc.json_schema.build_regex_from_schema(json.dumps(schema))
        g = oc.Guide(oc.Index(regex, voc))
        compile_s = time.perf_counter() - t
        bm = torch.zeros((V + 31) // 32, dtype=torch.int32)

        def mask(g=g, bm=bm):
            g.write_mask_into(bm.data_ptr(), bm.numel(), 4)
            return bm

        out[name] = (compile_s, *walk(mask, g.advance, g.is_finished, V, 0))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path.home() / ".cache/lmforge/models/smollm2-135m-instruct"
    p.add_argument("--tokenizer", type=Path, default=default, help="an HF directory")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
    spec = json.loads((args.tokenizer / "tokenizer.json").read_text())
    V = len(spec["model"]["vocab"])
    eos = next(t["id"] for t in spec["added_tokens"] if t["content"] == "<|im_end|>")
    CLOSERS.update(i for s, i in spec["model"]["vocab"].items() if "}" in s or "]" in s)
    CLOSERS.add(eos)
    rows, versions = [], {}
    for lib, fn in [
        ("llguidance", bench_llguidance),
        ("xgrammar", bench_xgrammar),
        ("outlines-core", bench_outlines),
    ]:
        try:
            results = fn(args.tokenizer, V, eos)
        except ImportError as e:
            print(f"{lib}: not installed ({e.name})")
            continue
        from importlib.metadata import version

        versions[lib] = version(lib.replace("-", "_") if lib == "outlines-core" else lib)
        for name, (compile_s, masks, advances) in results.items():
            rows.append((lib, name, compile_s, masks, advances))
    print(
        f"{'library':14} {'schema':12} {'compile ms':>10} {'mask us':>9} {'advance us':>10} {'tokens':>6}"
    )
    for lib, name, compile_s, masks, adv in rows:
        mask_us = statistics.mean(masks) * 1e6 if masks else float("nan")
        adv_us = statistics.mean(adv) * 1e6 if adv else float("nan")
        print(
            f"{lib:14} {name:12} {compile_s * 1e3:10.1f} {mask_us:9.0f} {adv_us:10.1f} {len(masks):6}"
        )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    print(
        json.dumps(
            {
                "device": "cpu",
                "threads": torch.get_num_threads(),
                "vocab": V,
                "torch": torch.__version__,
                "libraries": versions,
                "commit": commit,
            }
        )
    )


if __name__ == "__main__":
    main()
