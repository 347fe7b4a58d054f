"""`lmforge run`: the whole recipe, stage by stage, in one run directory.

The one idea: each stage folder carries `stage.json` with the hash of everything that
determines its output (its config and its inputs' hashes). A finished stage with the same hash
is skipped; an unfinished one is resumed (pretraining continues from its last checkpoint); a
stage whose inputs changed is moved aside — never deleted — and rebuilt.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from lmforge.config import RUNTIME_FIELDS, Recipe, config_hash, resolve_path
from lmforge.io import move_aside, read_json, write_json

STAGES = ("clean", "tokenizer", "data", "pretrain", "sft", "reward", "dpo", "sample", "eval")


class Interrupted(Exception):
    """A stage stopped early on the user's request, after saving what it had."""


def stage_hashes(recipe: Recipe) -> dict[str, str]:
    sources = [
        dict(dataclasses.asdict(s), path=str(resolve_path(s.path, recipe.base_dir)))
        for s in recipe.data.sources
    ]
    data = dataclasses.asdict(recipe.data) | {"sources": sources}
    clean = None
    if recipe.clean.steps:  # the tokenizer and prepare then read the cleaned shards
        runtime = ("num_workers", "executor", "ray_address")
        clean_cfg = {k: v for k, v in dataclasses.asdict(recipe.clean).items() if k not in runtime}
        clean = config_hash(clean_cfg, sources)
        sources = [clean, sources]
    tok = config_hash(recipe.tokenizer, sources)
    prep = config_hash(data, tok)
    pre = {k: v for k, v in dataclasses.asdict(recipe.pretrain).items() if k not in RUNTIME_FIELDS}
    pretrain = config_hash(recipe.model, pre, prep)
    sft_sources = [
        dict(dataclasses.asdict(s), path=str(resolve_path(s.path, recipe.base_dir)))
        for s in recipe.sft.sources
    ]
    sft_cfg = {k: v for k, v in dataclasses.asdict(recipe.sft).items() if k not in RUNTIME_FIELDS}
    sft = config_hash(sft_cfg | {"sources": sft_sources}, recipe.lora, pretrain)
    tuned = sft if recipe.sft.sources else None
    reward = config_hash(_train_cfg(recipe.reward, recipe.base_dir), tuned or pretrain)
    dpo = config_hash(
        _train_cfg(recipe.dpo, recipe.base_dir),
        recipe.lora if recipe.dpo.lora_r else None,
        tuned or pretrain,
        reward if recipe.reward.sources and not recipe.dpo.judge else None,
    )
    aligned = dpo if recipe.dpo.sources else None
    sample = config_hash(recipe.sample, pretrain, tuned, aligned)
    ev = config_hash(recipe.eval, pretrain, tuned, aligned)
    return {
        "clean": clean,
        "tokenizer": tok,
        "data": prep,
        "pretrain": pretrain,
        "sft": sft,
        "reward": reward,
        "dpo": dpo,
        "sample": sample,
        "eval": ev,
    }


def _train_cfg(cfg, base_dir: str) -> dict:
    """A training section as hashed: runtime options dropped, source paths resolved."""
    sources = [
        dict(dataclasses.asdict(s), path=str(resolve_path(s.path, base_dir))) for s in cfg.sources
    ]
    d = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUNTIME_FIELDS}
    return d | {"sources": sources}


def stage_state(stage_dir: Path) -> dict:
    try:
        return read_json(stage_dir / "stage.json", "stage state")
    except (FileNotFoundError, ValueError):
        return {}


def run_stage(name: str, out: Path, h: str, fn, force: bool = False, log=print) -> dict:
    """Run `fn(stage_dir)` unless the stage is already done for hash `h`."""
    d = out / name
    st = stage_state(d)
    if st.get("done") and st.get("hash") == h and not force:
        log(f"[{name}] up to date ({h}), skipping")
        return st.get("result", {})
    if d.exists() and (st.get("hash") != h or force):
        moved = move_aside(d, st.get("hash") or "old")
        log(f"[{name}] inputs changed: previous output moved to {moved}")
    elif st:
        log(f"[{name}] resuming unfinished stage")
    d.mkdir(parents=True, exist_ok=True)
    write_json(d / "stage.json", {"hash": h, "done": False})
    t0 = time.time()
    result = fn(d) or {}
    if result.get("interrupted"):
        raise Interrupted(f"{name} was interrupted; rerun the same command to resume")
    write_json(
        d / "stage.json", {"hash": h, "done": True, "seconds": time.time() - t0, "result": result}
    )
    return result


def data_config(recipe: Recipe, out: Path):
    """The documents the tokenizer and prepare read: the recipe's sources, or their cleaned
    shards in OUT/clean when the recipe has a clean stage."""
    if not recipe.clean.steps:
        return recipe.data
    from lmforge.data.clean import cleaned_sources
    from lmforge.data.readers import DataError

    st = stage_state(Path(out) / "clean")
    if not st.get("done"):
        raise DataError(
            f"the recipe has a clean stage but {Path(out) / 'clean'} is not finished: "
            f"run `lmforge clean` first (or `lmforge run`)"
        )
    return cleaned_sources(recipe.data, Path(out) / "clean")


def generate_samples(ckpt_dir, sample_cfg, device: str = "auto") -> list[dict]:
    """One generation per prompt from the checkpoint, with the recipe's sampling settings."""
    from lmforge.infer.chat import load_for_inference
    from lmforge.infer.generate import stream_text
    from lmforge.perf import pick_device

    model, tok = load_for_inference(ckpt_dir, device=pick_device(device))
    out = []
    for i, prompt in enumerate(sample_cfg.prompts):
        ids = [tok.bos_id] + tok.encode(prompt)
        text = "".join(
            stream_text(
                model,
                tok,
                ids,
                max_new_tokens=sample_cfg.max_new_tokens,
                temperature=sample_cfg.temperature,
                top_k=sample_cfg.top_k,
                top_p=sample_cfg.top_p,
                repetition_penalty=sample_cfg.repetition_penalty,
                seed=sample_cfg.seed + i,
            )
        )
        out.append({"prompt": prompt, "completion": text})
    return out


def chat_answers(ckpt_dir, sample_cfg, device: str = "auto") -> list[dict]:
    """Greedy answers to the recipe's chat prompts, each a fresh one-turn conversation."""
    from lmforge.infer.chat import answer, load_for_inference
    from lmforge.perf import pick_device

    model, tok = load_for_inference(ckpt_dir, device=pick_device(device))
    return [
        {
            "prompt": prompt,
            "answer": "".join(
                answer(
                    model,
                    tok,
                    [{"role": "user", "content": prompt}],
                    max_new_tokens=sample_cfg.chat_max_new_tokens,
                    temperature=0.0,
                    repetition_penalty=sample_cfg.repetition_penalty,
                )
            ),
        }
        for prompt in sample_cfg.chat_prompts
    ]


def run(recipe: Recipe, out: str | Path, force: tuple[str, ...] = (), log=print) -> dict:
    """tokenizer -> data (prepare) -> pretrain -> sft -> reward -> dpo (each when the recipe gives
    it sources) -> sample -> eval (when the recipe names tasks), then REPORT.md. Returns stage
    results."""
    from lmforge.align import sft
    from lmforge.data import prepare
    from lmforge.report import write_report
    from lmforge.tokenizer import run as train_tokenizer
    from lmforge.train import pretrain

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "recipe.json", dataclasses.asdict(recipe))
    hashes = stage_hashes(recipe)
    results: dict[str, dict] = {}
    t_start = time.time()
    try:
        if recipe.clean.steps:
            from lmforge.data import clean

            results["clean"] = run_stage(
                "clean",
                out,
                hashes["clean"],
                lambda d: clean.summary(clean.run(recipe.clean, recipe.data, recipe.base_dir, d)),
                "clean" in force,
                log,
            )
        data = data_config(recipe, out)
        results["tokenizer"] = run_stage(
            "tokenizer",
            out,
            hashes["tokenizer"],
            lambda d: train_tokenizer(recipe.tokenizer, data, recipe.base_dir, d),
            "tokenizer" in force,
            log,
        )
        results["data"] = run_stage(
            "data",
            out,
            hashes["data"],
            lambda d: prepare.run(data, out / "tokenizer", recipe.base_dir, d),
            "data" in force,
            log,
        )
        results["pretrain"] = run_stage(
            "pretrain",
            out,
            hashes["pretrain"],
            lambda d: pretrain.run(
                recipe.pretrain, recipe.model, out / "data", out / "tokenizer", d
            ),
            "pretrain" in force,
            log,
        )

        if recipe.sft.sources:
            results["sft"] = run_stage(
                "sft",
                out,
                hashes["sft"],
                lambda d: sft.run(
                    recipe.sft, recipe.lora, out / "pretrain" / "model", d, recipe.base_dir
                ),
                "sft" in force,
                log,
            )

        tuned = out / "sft" / ("adapter" if recipe.lora.r else "model")
        if not recipe.sft.sources:
            tuned = out / "pretrain" / "model"
        if recipe.reward.sources:
            from lmforge.align import reward

            results["reward"] = run_stage(
                "reward",
                out,
                hashes["reward"],
                lambda d: reward.run(recipe.reward, tuned, d, recipe.base_dir),
                "reward" in force,
                log,
            )
        if recipe.dpo.sources:
            from lmforge.align import dpo

            dpo_cfg = recipe.dpo
            if not dpo_cfg.judge and recipe.reward.sources:  # the run's own reward model judges
                dpo_cfg = dataclasses.replace(dpo_cfg, judge=str(out / "reward" / "model"))
            results["dpo"] = run_stage(
                "dpo",
                out,
                hashes["dpo"],
                lambda d: dpo.run(dpo_cfg, recipe.lora, tuned, d, recipe.base_dir),
                "dpo" in force,
                log,
            )

        def sample(d):
            base = out / "pretrain" / "model"
            samples = generate_samples(base, recipe.sample, recipe.pretrain.device)
            write_json(d / "samples.json", samples)
            result = {"samples": samples}
            if recipe.sft.sources and recipe.sample.chat_prompts:
                tuned = out / "sft" / ("adapter" if recipe.lora.r else "model")
                before = chat_answers(base, recipe.sample, recipe.pretrain.device)
                after = chat_answers(tuned, recipe.sample, recipe.sft.device)
                chat = [
                    {"prompt": b["prompt"], "before": b["answer"], "after": a["answer"]}
                    for b, a in zip(before, after)
                ]
                if recipe.dpo.sources:
                    aligned = out / "dpo" / ("adapter" if recipe.dpo.lora_r else "model")
                    for c, a in zip(chat, chat_answers(aligned, recipe.sample, recipe.dpo.device)):
                        c["dpo"] = a["answer"]
                write_json(d / "chat.json", chat)
                result["chat"] = chat
            return result

        results["sample"] = run_stage(
            "sample", out, hashes["sample"], sample, "sample" in force, log
        )

        def evaluate(d):
            from lmforge.eval import run as evaluation

            done = {}
            lora = {"sft": recipe.lora.r, "dpo": recipe.dpo.lora_r}
            for name in recipe.eval.models:
                if (name == "sft" and not recipe.sft.sources) or (
                    name == "dpo" and not recipe.dpo.sources
                ):
                    continue
                ckpt = out / name / ("adapter" if lora.get(name) else "model")
                rows = evaluation.run(
                    ckpt,
                    recipe.eval.tasks,
                    d / name,
                    recipe.eval.limit or None,
                    recipe.eval.seed,
                    unsafe_exec=recipe.eval.unsafe_exec,
                )
                done[name] = rows
            return {"models": list(done)}

        if recipe.eval.tasks:
            results["eval"] = run_stage("eval", out, hashes["eval"], evaluate, "eval" in force, log)
    finally:
        report = write_report(out)
        log(f"report: {report}")
    results["wall_seconds"] = time.time() - t_start
    return results
