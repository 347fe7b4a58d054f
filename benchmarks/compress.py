"""Compression: file size, validation perplexity and batch-1 decode speed of fp32, int8, int4
round-to-nearest, GPTQ int4 and 2:4 pruning, on the tiny recipe's model and a ~124M model,
in one run, with peers on the same weights.

Regime: one user decoding on a CPU (batch 1, greedy, `lmforge.infer.generate`), where every
new token reads every weight once, so tokens/s is bounded by memory bandwidth / bytes read per
token (`perf.memory_bandwidth` measures it here; the table gives the fraction reached). Quality
is validation perplexity on the run's held-out shards (English and Chinese), the same tokens
for every variant; calibration (GPTQ) uses training shards only.

Peers, same weights: transformers fp32 `generate`; PyTorch's own int8 (`torch.ao` dynamic
quantization of the transformers model: int8 weights and int8 activations per tensor, fbgemm);
llama.cpp (llama-cpp-python, f32 and q8_0 GGUF from `lmforge export --format gguf`) when
--llama-python names a Python that has it (it is not an lmforge dependency).

    python benchmarks/compress.py --run runs/tiny --big runs/bench-124m \\
        --llama-python /tmp/llamaenv/bin/python
(runs/bench-124m: `lmforge pretrain --config benchmarks/recipes/base-124m.yaml ...`, see there)
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from common import environment, median, print_json, print_table, quiet_transformers

from lmforge.compress import prune as prune_stage
from lmforge.compress import quantize as quantize_stage
from lmforge.config import PruneConfig, QuantizeConfig
from lmforge.data.loader import val_batches, val_languages
from lmforge.infer.generate import generate
from lmforge.model.load import load
from lmforge.perf import memory_bandwidth

PROMPT = "Once upon a time, there was a little girl named"

LLAMA_PROBE = """
import json, sys, time
import numpy as np
from llama_cpp import Llama
a = json.loads(sys.argv[1])
out = {}
for path in a["models"]:
    llm = Llama(model_path=path, n_ctx=a["n_ctx"], n_threads=a["threads"], verbose=False)
    times = []
    for _ in range(a["repeats"] + 1):
        llm.reset()
        t = time.perf_counter()
        llm.eval(a["prompt"])
        for _ in range(a["new"]):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([nxt])
        times.append(time.perf_counter() - t)
    out[path] = sorted(times[1:])[len(times[1:]) // 2]
print(json.dumps(out))
"""


def variants(model_dir: Path, data_dir: Path, work: Path, group: int) -> dict[str, Path]:
    """name -> model directory: the float model and each compressed copy (made once)."""
    out = {"fp32": model_dir}
    for method in ("int8", "int4", "gptq"):
        cfg = QuantizeConfig(method=method, group_size=group, eval_tokens=0, calib_samples=64)
        name = quantize_stage.output_name(cfg)
        if not (work / "quantize" / name / "model.safetensors").exists():
            quantize_stage.run(cfg, model_dir, data_dir, work / "quantize")
        out[{"int8": "int8", "int4": f"int4-rtn-g{group}", "gptq": f"gptq-g{group}"}[method]] = (
            work / "quantize" / name
        )
    pcfg = PruneConfig(method="2:4", max_steps=0, eval_tokens=1024)
    pruned = work / "prune" / prune_stage.OUT_NAMES["2:4"] / "model"
    if not (pruned / "model.safetensors").exists():
        prune_stage.run(pcfg, model_dir, data_dir, work / "prune")
    out["2:4 pruned"] = pruned
    return out


@torch.no_grad()
def quality(model, data_dir: Path, tokens: int, ref: dict | None = None):
    """Validation perplexity per language and, given the float model's log-probabilities
    (`ref`, as returned here for it), the mean KL(float || this model) per token: a far more
    sensitive measure of the damage than perplexity, which a small change can move either way.
    Returns (ppl, kl, log-probs by language)."""
    seq = min(256, model.cfg.max_seq_len)
    ppl, kl, logps = {}, {}, {}
    for lang in val_languages(data_dir):
        nll = div = n = 0.0
        logps[lang] = []
        for i, (x, y) in enumerate(val_batches(data_dir, lang, seq, 8, tokens)):
            logp = F.log_softmax(model(x).float(), dim=-1)
            nll += F.nll_loss(logp.flatten(0, 1), y.flatten(), reduction="sum").item()
            n += y.numel()
            if ref is None:
                logps[lang].append(logp)
            else:
                r = ref[lang][i]
                div += (r.exp() * (r - logp)).sum().item()
        ppl[lang] = math.exp(nll / n)
        kl[lang] = div / n
    return ppl, kl, logps


def decode_seconds(model, tok, new: int, repeats: int) -> tuple[float, list[int]]:
    ids = [tok.bos_id] + tok.encode(PROMPT)
    times, out = [], []
    for _ in range(repeats + 1):  # the first run warms up (and builds the kernels)
        t = time.perf_counter()
        out = list(generate(model, ids, max_new_tokens=new, temperature=0.0))
        times.append(time.perf_counter() - t)
    return median(times[1:]), out


def bytes_per_token(model) -> int:
    """Bytes a decode step reads: every parameter and buffer but the input embedding table
    (one row per token); a tied int8 head is read as the head."""
    seen, n = set(), 0
    emb = (
        getattr(model.tok_emb, "weight", None)
        if isinstance(model.tok_emb, torch.nn.Embedding)
        else None
    )
    head_w = (
        getattr(model.lm_head, "weight", None)
        if isinstance(model.lm_head, torch.nn.Linear)
        else None
    )
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.data_ptr() in seen or "rope_" in name:
            continue
        seen.add(t.data_ptr())
        if emb is not None and t is emb and (head_w is None or head_w is not emb):
            continue
        n += t.numel() * t.element_size()
    return n


class _Logits(torch.nn.Module):
    """A transformers model behind our `model(x) -> logits` call, for `evaluate`."""

    def __init__(self, hf, cfg):
        super().__init__()
        self.hf, self.cfg = hf, cfg

    def forward(self, x):
        return self.hf(x).logits


def peers(model_dir: Path, our_model, tok, args, data_dir: Path, gguf_dir: Path) -> list[dict]:
    from transformers import AutoModelForCausalLM

    rows = []
    ids = [tok.bos_id] + tok.encode(PROMPT)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dyn = torch.ao.quantization.quantize_dynamic(
            AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval(),
            {torch.nn.Linear},
            dtype=torch.qint8,
        )
    x = torch.tensor([ids])
    for name, m in (("transformers fp32", hf), ("torch.ao dynamic int8 (W8A8)", dyn)):
        times = []
        with torch.no_grad():
            for _ in range(args.repeats + 1):
                t = time.perf_counter()
                m.generate(
                    x,
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_id,
                )
                times.append(time.perf_counter() - t)
        ppl = quality(_Logits(m, our_model.cfg), data_dir, args.eval_tokens)[0]
        rows.append({"name": name, "seconds": median(times[1:]), "ppl": ppl, "bytes": None})
    if args.llama_python:
        from lmforge.compress.gguf import export_gguf

        files = {}
        for outtype in ("f32", "q8_0"):
            f = gguf_dir / f"{outtype}.gguf"
            if not f.exists():
                export_gguf(model_dir, f, outtype=outtype)
            files[outtype] = str(f)
        probe = {
            "models": list(files.values()),
            "n_ctx": min(512, our_model.cfg.max_seq_len),
            "threads": torch.get_num_threads(),
            "repeats": args.repeats,
            "prompt": ids,
            "new": args.new_tokens,
        }
        res = subprocess.run(
            [args.llama_python, "-c", LLAMA_PROBE, json.dumps(probe)],
            capture_output=True,
            text=True,
        )
        if res.returncode:
            print(f"llama.cpp probe failed: {res.stderr[-800:]}")
        else:
            secs = json.loads(res.stdout.strip().splitlines()[-1])
            for outtype, f in files.items():
                rows.append(
                    {
                        "name": f"llama.cpp {outtype}",
                        "seconds": secs[f],
                        "ppl": None,
                        "bytes": Path(f).stat().st_size,
                    }
                )
    return rows


def bench_model(label: str, model_dir: Path, data_dir: Path, args, bandwidth: float) -> dict:
    work = Path(args.work) / label
    found = variants(model_dir, data_dir, work, args.group_size)
    rows, results, ref = [], {}, None
    for name, path in found.items():  # fp32 first: its log-probabilities are the reference
        model, tok = load(path)
        size = (path / "model.safetensors").stat().st_size
        ppl, kl, logps = quality(model, data_dir, args.eval_tokens, ref)
        ref = ref or logps
        secs, out = decode_seconds(model, tok, args.new_tokens, args.repeats)
        tps = args.new_tokens / secs
        read = bytes_per_token(model)
        floor = bandwidth / read  # tokens/s if only the weights' bytes cost time
        results[name] = {
            "file_bytes": size,
            "ppl": ppl,
            "kl_to_fp32": kl,
            "tokens_per_s": tps,
            "bytes_per_token": read,
            "bandwidth_floor_fraction": tps / floor,
        }
        if name == "fp32":
            fp32_model, fp32_tok = model, tok
    base = results["fp32"]
    for name, r in results.items():
        rows.append(
            [
                name,
                r["file_bytes"] / 1e6,
                *(r["ppl"][lang] for lang in sorted(base["ppl"])),
                *(100 * (r["ppl"][lang] / base["ppl"][lang] - 1) for lang in sorted(base["ppl"])),
                *(1000 * r["kl_to_fp32"][lang] for lang in sorted(base["ppl"])),
                r["tokens_per_s"],
                r["tokens_per_s"] / base["tokens_per_s"],
                100 * r["bandwidth_floor_fraction"],
            ]
        )
    langs = sorted(base["ppl"])
    print(
        f"\n{label}: {model_dir} (decode: {args.new_tokens} greedy tokens, median of {args.repeats})"
    )
    print_table(
        [
            "variant",
            "MB",
            *(f"ppl {lang}" for lang in langs),
            *(f"d{lang} %" for lang in langs),
            *(f"KL {lang} e-3" for lang in langs),
            "tok/s",
            "x fp32",
            "% bw floor",
        ],
        rows,
    )
    del ref
    peer_rows = peers(model_dir, fp32_model, fp32_tok, args, data_dir, work)
    table = []
    for p in peer_rows:
        tps = args.new_tokens / p["seconds"]
        ours = "int8" if "int8" in p["name"] or "q8_0" in p["name"] else "fp32"
        table.append(
            [
                p["name"],
                tps,
                results[ours]["tokens_per_s"] / tps,
                *((p["ppl"][lang] for lang in langs) if p["ppl"] else ("-",) * len(langs)),
            ]
        )
        results[f"peer: {p['name']}"] = {
            "tokens_per_s": tps,
            "ppl": p["ppl"],
            "file_bytes": p["bytes"],
        }
    print("peers on the same weights (ours/peer: our fp32 or int8 tokens/s over theirs)")
    print_table(["peer", "tok/s", "ours/peer", *(f"ppl {lang}" for lang in langs)], table)
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/tiny", help="a tiny-recipe run (pretrain/model, data)")
    ap.add_argument("--big", default="", help="a run with the ~124M model (pretrain/model)")
    ap.add_argument("--data", default="", help="shards for --big (default: RUN/data)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--eval-tokens", type=int, default=16384, help="per language")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-python", default="", help="a Python with llama-cpp-python")
    ap.add_argument("--work", default="", help="where compressed copies go (default: a temp dir)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    quiet_transformers()
    tmp = None
    if not args.work:
        tmp = tempfile.mkdtemp(prefix="lmforge-compress-")
        args.work = tmp
    run = Path(args.run)
    data = Path(args.data) if args.data else run / "data"
    bandwidth = memory_bandwidth()
    print(f"memory bandwidth: {bandwidth / 1e9:.1f} GB/s; threads {args.threads}")
    out = {"tiny": bench_model("tiny", run / "pretrain" / "model", run / "data", args, bandwidth)}
    if args.big:
        out["124m"] = bench_model(
            "124m", Path(args.big) / "pretrain" / "model", data, args, bandwidth
        )
    print_json(
        "compress",
        environment(torch.device("cpu"), torch.float32),
        bandwidth_gbs=bandwidth / 1e9,
        args=vars(args),
        results=out,
    )
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
