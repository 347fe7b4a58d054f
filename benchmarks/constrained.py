"""How often SmolLM2-135M-Instruct's JSON is valid for a schema it is asked to follow, with and
without constrained decoding, and what the constraint costs in decode speed (CPU, batch 1).

Why: a 135M model rarely writes JSON that validates on its own; the grammar should make every
finished answer valid, at a per-token price small next to the forward pass. The schemas are
made up (seeded): nested objects, enums, arrays, numbers with ranges, required and optional
fields. Greedy decoding, the schema in the user message; "valid" means the whole reply parses
and validates (jsonschema), "valid (extracted)" the first {...} span in it; "cut": replies
that reached --max_tokens before ending (a constrained reply is then valid so far but unclosed,
e.g. a number with no digit limit that the model keeps extending).

    OMP_NUM_THREADS=2 python benchmarks/constrained.py --schemas 100 [--model DIR]

With --tools, the same schemas are the parameters of a tool (`record_N`, described in words)
and the user asks for a call, as an OpenAI client would with `tools=[...]`: "auto" lets the
model answer as it likes (text or a call), "forced" prefills the call's head as
`tool_choice={"type": "function", ...}` does (the arguments are free), "constrained" adds the
call grammar the server uses (infer/constrain.py:tool_call_grammar). "valid" means one call to
that tool whose arguments validate.

    OMP_NUM_THREADS=1 python benchmarks/constrained.py --tools --schemas 100 --max_tokens 96
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import time
from pathlib import Path

import torch

from lmforge.infer.chat import chat_prompt_ids
from lmforge.infer.constrain import Constraint, check_json, json_grammar, tool_call_grammar
from lmforge.infer.generate import generate, special_ids
from lmforge.infer.toolcall import parse_tool_calls
from lmforge.model.load import load
from lmforge.tokenizer import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

WORDS = ["name", "city", "price", "count", "tags", "owner", "status", "score", "items", "meta"]


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A made-up object schema with 2-4 properties of varied kinds, nested at most twice."""
    props = {}
    for key in rng.sample(WORDS, rng.randint(2, 4)):
        kind = rng.choice(["string", "integer", "number", "enum", "boolean", "array", "object"])
        if kind == "object" and depth >= 2:
            kind = "string"
        if kind == "string":
            props[key] = {"type": "string", "maxLength": rng.choice([8, 16, 32])}
        elif kind == "integer":
            props[key] = {"type": "integer", "minimum": 0, "maximum": rng.choice([10, 100, 1000])}
        elif kind == "number":
            props[key] = {"type": "number"}
        elif kind == "enum":
            props[key] = {"enum": rng.sample(["red", "green", "blue", "open", "closed"], 3)}
        elif kind == "boolean":
            props[key] = {"type": "boolean"}
        elif kind == "array":
            item = rng.choice([{"type": "string", "maxLength": 8}, {"type": "integer"}])
            props[key] = {"type": "array", "items": item, "maxItems": 3}
        else:
            props[key] = random_schema(rng, depth + 1)
    required = [k for k in props if rng.random() < 0.7] or list(props)[:1]
    return {
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": False,
    }


def extracted(text: str) -> str:
    start, end = text.find("{"), text.rfind("}")
    return text[start : end + 1] if 0 <= start < end else text


def run_one(model, tok, schema: dict, constrained: bool, max_tokens: int):
    """(reply text, new tokens, seconds) for one greedy answer."""
    msg = f"Reply with only a JSON object that matches this JSON schema:\n{json.dumps(schema)}"
    prompt = tok.encode_chat([{"role": "user", "content": msg}], add_generation_prompt=True)
    V = model.cfg.vocab_size
    constraint = Constraint(tok, json_grammar(schema), V, tok.stop_ids()) if constrained else None
    t = time.perf_counter()
    ids = list(
        generate(
            model,
            prompt,
            max_new_tokens=max_tokens,
            stop_ids=tok.stop_ids(),
            banned=special_ids(tok, V),
            constraint=constraint,
        )
    )
    seconds = time.perf_counter() - t
    text = tok.decode([i for i in ids if i not in tok.stop_ids()])
    return text, len(ids), seconds


def run_call(model, tok, n: int, schema: dict, mode: str, max_tokens: int):
    """(arguments text or None, valid, new tokens, seconds) for one greedy tool call."""
    name = f"record_{n}"
    tool = {
        "type": "function",
        "function": {"name": name, "description": "Store one record", "parameters": schema},
    }
    ask = [{"role": "user", "content": f"Store a record with {name}, any sensible values."}]
    prompt = chat_prompt_ids(tok, ask, [tool])
    prefill = "" if mode == "auto" else f'{TOOL_CALL_OPEN}\n{{"name": "{name}", "arguments": '
    prompt += tok.encode(prefill)
    V = model.cfg.vocab_size
    constraint = None
    if mode == "constrained":
        grammar = tool_call_grammar({name: schema}, True, f"\n{TOOL_CALL_CLOSE}")
        constraint = Constraint(tok, grammar, V, tok.stop_ids())
    t = time.perf_counter()
    ids = []
    for i in generate(
        model,
        prompt,
        max_new_tokens=max_tokens,
        stop_ids=tok.stop_ids(),
        banned=special_ids(tok, V),
        constraint=constraint,
    ):
        ids.append(i)
        if TOOL_CALL_CLOSE in tok.decode(ids[-8:]):  # the server's stop with one call
            break
    seconds = time.perf_counter() - t
    text = prefill + tok.decode([i for i in ids if i not in tok.stop_ids()])
    _, calls = parse_tool_calls(text)
    ok = [c for c in calls if c["function"]["name"] == name]
    arguments = ok[0]["function"]["arguments"] if len(calls) == 1 and ok else None
    valid = arguments is not None and check_json(arguments, schema) is None
    return text, valid, len(ids), seconds


def tool_prompt(tok, n: int, schema: dict, mode: str) -> tuple[list[int], str, str]:
    """(prompt ids with the forced call's prefill, the prefill, the tool's name)."""
    name = f"record_{n}"
    tool = {
        "type": "function",
        "function": {"name": name, "description": "Store one record", "parameters": schema},
    }
    ask = [{"role": "user", "content": f"Store a record with {name}, any sensible values."}]
    prefill = "" if mode == "auto" else f'{TOOL_CALL_OPEN}\n{{"name": "{name}", "arguments": '
    return chat_prompt_ids(tok, ask, [tool]) + tok.encode(prefill), prefill, name


def tool_engine(model, tok, schemas: list[dict], max_tokens: int, modes: list[str], batch: int):
    """The server's path: all schemas of a mode through the batched engine (as concurrent
    requests would be), `</tool_call>` as a stop string as with parallel_tool_calls=false."""
    from lmforge.infer.engine import Engine, SamplingParams

    for mode in modes:
        engine = Engine(model, tok, max_batch=batch)
        reqs = []
        for n, schema in enumerate(schemas):
            prompt, prefill, name = tool_prompt(tok, n, schema, mode)
            grammar = None
            if mode == "constrained":
                grammar = tool_call_grammar({name: schema}, True, f"\n{TOOL_CALL_CLOSE}")
            params = SamplingParams(max_tokens=max_tokens, stop_ids=tok.stop_ids(),
                                    stop=[TOOL_CALL_CLOSE], grammar=grammar)  # fmt: skip
            reqs.append((engine.submit(prompt, params), prefill, name, schema))
        t = time.perf_counter()
        engine.run_until_done()
        seconds = time.perf_counter() - t
        valid = tokens = cut = 0
        for req, prefill, name, schema in reqs:
            _, calls = parse_tool_calls(prefill + req.text)
            ok = len(calls) == 1 and calls[0]["function"]["name"] == name
            valid += ok and check_json(calls[0]["function"]["arguments"], schema) is None
            tokens += len(req.output_ids)
            cut += req.finish_reason == "length"
        print(f"{mode} example: {prefill + reqs[0][0].text!r}")
        print(f"{mode:12} valid {valid}/{len(reqs)}  cut {cut}  tokens {tokens}  "
              f"{tokens / seconds:.1f} tokens/s (batch {batch}, prefill included)", flush=True)  # fmt: skip


def tool_main(model, tok, schemas: list[dict], max_tokens: int, modes: list[str]) -> None:
    """Tool-call arguments: valid share, tokens, tokens/s per mode, a table every 5."""
    stats = {mode: [0, 0, 0.0, 0] for mode in modes}
    for n, schema in enumerate(schemas):
        for mode, row in stats.items():
            text, valid, k, s = run_call(model, tok, n, schema, mode, max_tokens)
            row[0] += valid
            row[1], row[2] = row[1] + k, row[2] + s
            row[3] += k >= max_tokens
            if n < 2:
                print(f"{mode} example: {text[:200]!r}", flush=True)
        if n % 5 == 4 or n == len(schemas) - 1:
            print(f"\nafter {n + 1} tool schemas")
            print(f"{'mode':12} {'valid':>6} {'cut':>4} {'tokens':>7} {'tokens/s':>9}")
            for mode, (valid, tokens, seconds, cut) in stats.items():
                rate = tokens / seconds
                print(f"{mode:12} {valid / (n + 1):6.0%} {cut:4} {tokens:7} {rate:9.1f}")
            print(flush=True)


def print_table(stats: dict, n: int) -> None:
    print(f"\nafter {n} schemas")
    print(
        f"{'mode':12} {'valid':>6} {'valid (extracted)':>18} {'cut':>4} {'tokens':>7} {'tokens/s':>9}"
    )
    for mode, (valid, ext, tokens, seconds, cut) in stats.items():
        print(
            f"{mode:12} {valid / n:6.0%} {ext / n:18.0%} {cut:4} {tokens:7} {tokens / seconds:9.1f}"
        )
    print(flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", default=str(Path.home() / ".cache/lmforge/models/smollm2-135m-instruct")
    )
    p.add_argument("--schemas", type=int, default=100)
    p.add_argument("--max_tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tools", action="store_true", help="tool-call arguments instead")
    p.add_argument("--modes", default="auto,forced,constrained", help="with --tools")
    p.add_argument("--batch", type=int, default=0, help="with --tools: the batched engine")
    args = p.parse_args()
    model, tok = load(args.model, device="cpu")
    rng = random.Random(args.seed)
    schemas = [random_schema(rng) for _ in range(args.schemas)]
    Constraint(tok, json_grammar(None), model.cfg.vocab_size, tok.stop_ids())  # build once
    if args.tools and args.batch:
        tool_engine(model, tok, schemas, args.max_tokens, args.modes.split(","), args.batch)
        print(json.dumps({"threads": torch.get_num_threads(), "schemas": len(schemas)}))
        return
    if args.tools:
        tool_main(model, tok, schemas, args.max_tokens, args.modes.split(","))
        print(json.dumps({"threads": torch.get_num_threads(), "schemas": len(schemas)}))
        return
    # both modes per schema, a running table every 5: a run stopped early still has figures
    stats = {mode: [0, 0, 0, 0.0, 0] for mode in ("free", "constrained")}
    for n, schema in enumerate(schemas):
        for mode, row in stats.items():
            text, k, s = run_one(model, tok, schema, mode == "constrained", args.max_tokens)
            row[0] += check_json(text, schema) is None
            row[1] += check_json(extracted(text), schema) is None
            row[2], row[3] = row[2] + k, row[3] + s
            row[4] += k >= args.max_tokens  # cut by max_tokens before the reply ended
            if n < 2:
                print(f"{mode} example: {text[:160]!r}", flush=True)
        if n % 5 == 4 or n == len(schemas) - 1:
            print_table(stats, n + 1)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    print(
        json.dumps(
            {
                "device": "cpu",
                "threads": torch.get_num_threads(),
                "dtype": "float32",
                "schemas": len(schemas),
                "torch": torch.__version__,
                "commit": commit,
            }
        )
    )


if __name__ == "__main__":
    main()
