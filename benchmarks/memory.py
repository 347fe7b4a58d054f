"""Multi-turn memory: is a fact stated at turn 2 still answered at turn 30, when the conversation
has outgrown the context, for each memory strategy (`lmforge chat --memory`)?

The conversations are made up for this benchmark: each script states one fact at turn 2 (a
name, a number or a city), then 27 unrelated turns (the same made-up small talk, rotated per
script), then asks for the fact at turn 30. Turns 1-29 have scripted assistant replies (so every
strategy sees the same conversation and only the answer at turn 30 is generated); the memory is
still run turn by turn as `lmforge chat` runs it, so `summary` folds the turns into its running
summary as they fall out, one model call per turn that falls out, exactly as in a chat.

A fact counts as recalled when the greedy answer at turn 30 contains it (case-insensitive).
`full` is the whole conversation in the prompt (SmolLM2 has 8192 tokens of context), for
contrast: what the model answers when nothing is lost.

    OMP_NUM_THREADS=1 python benchmarks/memory.py --model-dir \
        ~/.cache/lmforge/models/smollm2-135m-instruct --budget 512 --out runs/memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from lmforge.infer.chat import answer, chat_prompt_ids
from lmforge.infer.memory import STRATEGIES, make_memory, model_summariser
from lmforge.model.load import load

# (fact turn: user, assistant), the question at turn 30, the fact the answer must contain;
# all made up for this benchmark
SCRIPTS = [
    (("By the way, my sister's name is Aurelia.", "Aurelia is a lovely name for your sister."),
     "What is my sister's name?", "Aurelia"),
    (("My bike lock code is 4817, I keep forgetting it.", "Got it: your bike lock code is 4817."),
     "What is my bike lock code?", "4817"),
    (("I grew up in Valparaiso, on the coast.", "Valparaiso sounds like a beautiful place to grow up."),
     "Which city did I grow up in?", "Valparaiso"),
    (("My cat is called Pistachio.", "Pistachio is a fun name for a cat!"),
     "What is my cat called?", "Pistachio"),
    (("I live in apartment number 306.", "Noted, you live in apartment 306."),
     "What is my apartment number?", "306"),
]  # fmt: skip

# 27 turns of made-up small talk, free of names, numbers and cities
FILLER = [
    ("How do I make a cup of green tea?", "Heat water until just below boiling, pour it over the leaves and steep for two or three minutes."),
    ("Why is the sky blue?", "Sunlight scatters off air molecules, and blue light scatters the most, so the sky looks blue."),
    ("Can you suggest a quick breakfast?", "Oatmeal with fruit, or yogurt with granola, are quick and filling."),
    ("What is a good way to start running?", "Begin with short runs mixed with walking, and add a little more each week."),
    ("How do plants make food?", "Plants use sunlight, water and carbon dioxide to make sugar through photosynthesis."),
    ("Any tips for sleeping better?", "Keep a regular bedtime, avoid screens late at night and keep the room dark and cool."),
    ("What should I pack for a picnic?", "Sandwiches, fruit, water, a blanket and something to keep the food cool."),
    ("How do I keep houseplants alive?", "Give them enough light, water only when the soil is dry and avoid cold drafts."),
    ("What makes bread rise?", "Yeast eats sugars in the dough and releases gas, which makes the bread rise."),
    ("Is it better to read books or listen to audiobooks?", "Both are good; reading helps focus while audiobooks fit into busy days."),
    ("How can I learn to cook?", "Start with simple recipes, cook often and taste as you go."),
    ("Why do leaves change color in autumn?", "Trees stop making green chlorophyll, so the yellow and red pigments show."),
    ("What is a healthy snack?", "Nuts, fruit, carrots with hummus or a boiled egg are healthy snacks."),
    ("How do I stay focused while studying?", "Work in short blocks, take breaks and keep your phone out of reach."),
    ("What is the best way to wash vegetables?", "Rinse them under cold running water and scrub firm ones with a brush."),
    ("How do bees make honey?", "Bees collect nectar from flowers and store it in the hive, where it thickens into honey."),
    ("Should I stretch before exercise?", "A gentle warm-up with light movement is better than long stretches before exercise."),
    ("How do I clean a cast iron pan?", "Wash it with hot water, dry it well and rub in a thin layer of oil."),
    ("What causes thunder?", "Lightning heats the air very quickly, and the air expands with a loud boom."),
    ("Any ideas for a rainy afternoon?", "Bake something, play a board game, read or watch a good film."),
    ("How do I make my coffee less bitter?", "Use fresher beans, a coarser grind or water that is a little cooler."),
    ("Why do cats purr?", "Cats purr when they are relaxed, and sometimes to calm themselves."),
    ("What is a good gift for a friend who likes gardening?", "Gloves, seeds, a small trowel or a nice plant pot."),
    ("How can I save energy at home?", "Turn off lights you are not using, and wash clothes in cold water."),
    ("What is the difference between weather and climate?", "Weather is what happens day to day; climate is the pattern over many years."),
    ("How do I write a good email?", "Keep it short, put the main point first and end with a clear request."),
    ("What is a fun hobby to pick up?", "Drawing, baking, hiking or learning an instrument are fun hobbies."),
]  # fmt: skip
GREETING = ("Hi there!", "Hello! How can I help you today?")


def conversation(i: int) -> tuple[list[dict], str]:
    """Script i's 29 scripted turns plus the question (30 user messages) and its fact."""
    fact_turn, question, fact = SCRIPTS[i]
    filler = FILLER[3 * i :] + FILLER[: 3 * i]  # rotated: each script has other neighbours
    msgs = []
    for user, reply in [GREETING, fact_turn, *filler]:
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return msgs + [{"role": "user", "content": question}], fact


def run_script(model, tok, strategy: str, msgs: list[dict], fact: str, budget: int, summarise):
    """Play the conversation turn by turn through one memory, as `lmforge chat` does (history
    keeps only the turns not yet fallen out); answer the last user message."""
    t0 = time.perf_counter()
    if strategy == "full":
        prompt, note, calls = msgs, "", 0
    else:
        memory = make_memory(strategy, summarise=summarise)
        history: list[dict] = []
        for k in range(0, len(msgs), 2):
            history.append(msgs[k])
            fitted = memory.fit(tok, history, budget)
            history = fitted.kept
            if k + 1 < len(msgs):
                history.append(msgs[k + 1])
        prompt, note, calls = fitted.messages, fitted.note, getattr(memory, "calls", 0)
    reply = "".join(answer(model, tok, prompt, max_new_tokens=48, temperature=0)).strip()
    return {
        "prompt_tokens": len(chat_prompt_ids(tok, prompt)),
        # was the fact still in the prompt (window or note)? tells the memory's part from the
        # model's: a fact in the prompt can still be answered wrong
        "in_prompt": any(fact.lower() in str(m["content"]).lower() for m in prompt),
        "note": note,
        "summary_calls": calls,
        "answer": reply,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--budget", type=int, default=512, help="prompt tokens (default: 512)")
    ap.add_argument("--scripts", type=int, default=len(SCRIPTS), help="how many scripts")
    ap.add_argument("--strategies", default="full," + ",".join(STRATEGIES))
    ap.add_argument("--out", default=None, help="write every answer and note as JSON here")
    args = ap.parse_args()
    model, tok = load(args.model_dir, device="cpu")
    summarise = model_summariser(model, tok, max_new_tokens=96)
    strategies = args.strategies.split(",")
    full_len = len(chat_prompt_ids(tok, conversation(0)[0]))
    print(f"threads={torch.get_num_threads()} budget={args.budget} full prompt≈{full_len} tokens")
    rows, recalled, in_prompt = [], dict.fromkeys(strategies, 0), dict.fromkeys(strategies, 0)
    for i in range(args.scripts):
        msgs, fact = conversation(i)
        for s in strategies:
            r = run_script(model, tok, s, msgs, fact, args.budget, summarise)
            r.update(script=i, strategy=s, fact=fact, recalled=fact.lower() in r["answer"].lower())
            recalled[s] += r["recalled"]
            in_prompt[s] += r["in_prompt"]
            rows.append(r)
            print(json.dumps(r, ensure_ascii=False), flush=True)
    print(f"\nfact from turn 2 recalled at turn 30 (n={args.scripts}, budget {args.budget} tokens)")
    print("| strategy | fact still in the prompt | fact in the answer |\n|---|---|---|")
    for s in strategies:
        print(f"| {s} | {in_prompt[s]}/{args.scripts} | {recalled[s]}/{args.scripts} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, ensure_ascii=False, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
