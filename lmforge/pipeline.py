"""`lmforge run`: the whole recipe, stage by stage, in one run directory.

The one idea: each stage folder carries `stage.json` with the hash of everything that
determines its output (its config and its inputs' hashes). A finished stage with the same hash
is skipped; an unfinished one is resumed (pretraining continues from its last checkpoint); a
stage whose inputs changed is moved aside — never deleted — and rebuilt.

Two starts: from scratch (clean -> tokenizer -> data -> pretrain), or from an existing model
(`base.model`: a name `lmforge fetch` knows, or a model directory), whose own tokenizer then
prepares the recipe's data (held-out text and calibration). Either way the same stages follow:
sft -> reward -> dpo -> quantize -> sample -> eval, and the report puts every model side by side.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from lmforge.config import (
    RUNTIME_FIELDS,
    ConfigError,
    Recipe,
    config_hash,
    model_family,
    resolve_path,
)
from lmforge.io import move_aside, read_json, write_json
from lmforge.stages import BY_NAME, MODEL_STAGES, RUN_ORDER, output_dir


class Interrupted(Exception):
    """A stage stopped early on the user's request, after saving what it had."""


def stage_hashes(recipe: Recipe) -> dict[str, str | None]:
    """Each stage of RUN_ORDER -> the hash of what determines its output (None: not in this
    recipe's start). A stage's hash includes the hashes of the stages it reads."""
    sources = [
        dict(dataclasses.asdict(s), path=str(resolve_path(s.path, recipe.base_dir)))
        for s in recipe.data.sources
    ]
    data = dataclasses.asdict(recipe.data) | {"sources": sources}
    clean = tok = base = None
    if recipe.base.model:  # an existing model: its own tokenizer prepares the data
        base = config_hash(recipe.base, base_fingerprint(recipe))
        prep = config_hash(data, base)
        pretrain = base  # what the later stages start from
    else:
        if recipe.clean.steps:  # the tokenizer and prepare then read the cleaned shards
            runtime = ("num_workers", "executor", "ray_address")
            clean_cfg = {
                k: v for k, v in dataclasses.asdict(recipe.clean).items() if k not in runtime
            }
            clean = config_hash(clean_cfg, sources)
            sources = [clean, sources]
        tok = config_hash(recipe.tokenizer, sources)
        prep = config_hash(data, tok)
        pre = {
            k: v for k, v in dataclasses.asdict(recipe.pretrain).items() if k not in RUNTIME_FIELDS
        }
        pretrain = config_hash(recipe.model, pre, prep)
    sft_sources = [
        dict(dataclasses.asdict(s), path=str(resolve_path(s.path, recipe.base_dir)))
        for s in recipe.sft.sources
    ]
    sft_cfg = {k: v for k, v in dataclasses.asdict(recipe.sft).items() if k not in RUNTIME_FIELDS}
    del sft_cfg["lora"]  # hashed on its own, as when it was a section of the recipe
    sft = config_hash(sft_cfg | {"sources": sft_sources}, recipe.sft.lora, pretrain)
    tuned = sft if recipe.sft.sources else None
    reward = config_hash(_train_cfg(recipe.reward, recipe.base_dir), tuned or pretrain)
    dpo_cfg = _train_cfg(recipe.dpo, recipe.base_dir)
    dpo_lora = dpo_cfg.pop("lora")  # hashed as when the rank was dpo.lora_r
    dpo = config_hash(
        dpo_cfg | {"lora_r": dpo_lora["r"]},
        dpo_lora if dpo_lora["r"] else None,
        tuned or pretrain,
        reward if recipe.reward.sources and not recipe.dpo.judge else None,
    )
    aligned = dpo if recipe.dpo.sources else None
    quantize = None
    if recipe.quantize.methods:
        quantize = config_hash(recipe.quantize, aligned or tuned or pretrain, prep)
    sample = config_hash(recipe.sample, pretrain, tuned, aligned, quantize)
    ev = config_hash(recipe.eval, pretrain, tuned, aligned, quantize, prep)
    hashes = dict(base=base, clean=clean, tokenizer=tok, data=prep, pretrain=pretrain, sft=sft)
    hashes |= dict(reward=reward, dpo=dpo, quantize=quantize, sample=sample, eval=ev)
    return {name: hashes[name] for name in RUN_ORDER}


def _train_cfg(cfg, base_dir: str) -> dict:
    """A training section as hashed: runtime options dropped, source paths resolved."""
    sources = [
        dict(dataclasses.asdict(s), path=str(resolve_path(s.path, base_dir))) for s in cfg.sources
    ]
    d = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUNTIME_FIELDS}
    return d | {"sources": sources}


def base_fingerprint(recipe: Recipe) -> str:
    """What identifies the base model's weights without reading them: a fetched model's pinned
    sha256, or a directory's path with the size and time of its weights file."""
    from lmforge import fetch

    name = recipe.base.model
    if name in fetch.MODELS:
        return fetch.MODELS[name].sha256
    path = resolve_path(name, recipe.base_dir)
    weights = Path(path) / "model.safetensors"
    if weights.is_file():
        st = weights.stat()
        return f"{path}:{st.st_size}:{st.st_mtime_ns}"
    return str(path)


def base_model_dir(recipe: Recipe, log=print) -> Path:
    """The directory of `base.model`: a fetched model (fetched now if the cache lacks it) or
    an existing model directory."""
    from lmforge import fetch
    from lmforge.config import ConfigError

    name = recipe.base.model
    if name in fetch.MODELS:
        return fetch.cached_model(name) or fetch.fetch(name)
    path = Path(resolve_path(name, recipe.base_dir))
    if not (path / "config.json").is_file():
        known = ", ".join(fetch.MODELS)
        raise ConfigError(
            f"base.model {name!r} is neither a model `lmforge fetch` knows ({known}) nor a model "
            f"directory (no config.json in {path})"
        )
    return path


def model_dirs(recipe: Recipe, out: Path, root: Path) -> dict[str, Path]:
    """Every model the run makes, by the names eval.models uses, in the order they are made:
    the start (pretrain or base), sft, dpo, then each quantized one."""
    from lmforge.compress.quantize import output_name

    dirs = {"base" if recipe.base.model else "pretrain": root}
    for st in (BY_NAME[n] for n in MODEL_STAGES if BY_NAME[n].model_from):  # the tuned ones
        cfg = getattr(recipe, st.section)
        if cfg.sources:  # the recipe gives it data
            dirs[st.name] = output_dir(out, st.name, cfg.lora.r if st.adapts else 0)
    for method in recipe.quantize.methods:
        name = output_name(dataclasses.replace(recipe.quantize, method=method))
        dirs[name] = out / "quantize" / name
    return dirs


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
    from lmforge.infer.generate import stream_text
    from lmforge.model.load import load
    from lmforge.perf import pick_device

    model, tok = load(ckpt_dir, device=pick_device(device))
    out = []
    for i, prompt in enumerate(sample_cfg.prompts):
        ids = ([tok.bos_id] if tok.prepend_bos else []) + tok.encode(prompt)
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
    from lmforge.infer.chat import answer
    from lmforge.model.load import load
    from lmforge.perf import pick_device

    model, tok = load(ckpt_dir, device=pick_device(device))
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
    """The start (base, or clean -> tokenizer -> data -> pretrain), then sft -> reward -> dpo ->
    quantize (each when the recipe gives it sources or methods) -> sample -> eval (when the
    recipe names tasks), then REPORT.md. Returns stage results."""
    from lmforge.align import sft
    from lmforge.report import write_report

    family = model_family(recipe.model)
    if not recipe.base.model and family in ("encoder", "seq2seq"):
        kind = "an encoder" if family == "encoder" else "an encoder-decoder"
        raise ConfigError(
            f"model.arch {recipe.model.arch!r} is {kind}: `lmforge run` chains decoder stages "
            "(sft, sample, eval); pretrain it with `lmforge pretrain` (docs/embeddings.md)"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "recipe.json", dataclasses.asdict(recipe))
    hashes = stage_hashes(recipe)
    results: dict[str, dict] = {}
    t_start = time.time()

    def stage(name: str, fn) -> dict:
        results[name] = run_stage(name, out, hashes[name], fn, name in force, log)
        return results[name]

    try:
        root = _start(recipe, out, stage, log)
        models = model_dirs(recipe, out, root)
        if recipe.sft.sources:
            stage("sft", lambda d: sft.run(recipe.sft, recipe.sft.lora, root, d, recipe.base_dir))
        tuned = models.get("sft", root)
        if recipe.reward.sources:
            from lmforge.align import reward

            stage("reward", lambda d: reward.run(recipe.reward, tuned, d, recipe.base_dir))
        if recipe.dpo.sources:
            from lmforge.align import dpo

            dpo_cfg = recipe.dpo
            if not dpo_cfg.judge and recipe.reward.sources:  # the run's own reward model judges
                dpo_cfg = dataclasses.replace(
                    dpo_cfg, judge=str(output_dir(out, "reward", lora_r=0))
                )
            stage("dpo", lambda d: dpo.run(dpo_cfg, dpo_cfg.lora, tuned, d, recipe.base_dir))
        if recipe.quantize.methods:
            final = models.get("dpo", tuned)
            stage("quantize", lambda d: _quantize_all(recipe, final, out / "data", d, log))

        def sample(d):
            samples = generate_samples(root, recipe.sample, recipe.pretrain.device)
            write_json(d / "samples.json", samples)
            result = {"samples": samples}
            if recipe.sample.chat_prompts and len(models) > 1:
                answers = {
                    name: chat_answers(path, recipe.sample, recipe.sft.device)
                    for name, path in models.items()
                }
                chat = [
                    {"prompt": p, "answers": {name: a[i]["answer"] for name, a in answers.items()}}
                    for i, p in enumerate(recipe.sample.chat_prompts)
                ]
                write_json(d / "chat.json", chat)
                result["chat"] = chat
            return result

        stage("sample", sample)

        def evaluate(d):
            from lmforge import safety_suite
            from lmforge.eval import run as evaluation

            cfg, done = recipe.eval, {}
            by_limit: dict[int, list[str]] = {}  # one pass over the tasks per distinct limit
            for task in safety_suite.expand(cfg.tasks):
                by_limit.setdefault(cfg.limits.get(task, cfg.limit), []).append(task)
            for name in cfg.models:
                if name not in models:  # that stage is not in this recipe
                    continue
                done[name] = []
                for limit, tasks in by_limit.items():
                    done[name] += evaluation.run(
                        models[name],
                        [t.replace("lm:data", f"lm:{out / 'data'}", 1) for t in tasks],
                        d / name,
                        limit or None,
                        cfg.seed,
                        unsafe_exec=cfg.unsafe_exec,
                        runners=safety_suite.RUNNERS,
                    )
            return {"models": list(done)}

        if recipe.eval.tasks:
            stage("eval", evaluate)
    finally:
        report = write_report(out)
        log(f"report: {report}")
    results["wall_seconds"] = time.time() - t_start
    return results


def _start(recipe: Recipe, out: Path, stage, log) -> Path:
    """Run the stages that make the model everything else starts from; returns its directory.
    From an existing model: record it (fetching it first if needed) and tokenize the recipe's
    data with its tokenizer. From scratch: clean, tokenizer, data, pretrain."""
    from lmforge.data import prepare

    if recipe.base.model:
        root = base_model_dir(recipe, log)
        stage("base", lambda d: {"model": str(root), "fingerprint": base_fingerprint(recipe)})
        if recipe.data.sources:
            stage("data", lambda d: prepare.run(recipe.data, root, recipe.base_dir, d))
        return root
    from lmforge.tokenizer_train import run as train_tokenizer
    from lmforge.train import pretrain

    if recipe.clean.steps:
        from lmforge.data import clean

        stage(
            "clean",
            lambda d: clean.summary(clean.run(recipe.clean, recipe.data, recipe.base_dir, d)),
        )
    data = data_config(recipe, out)
    stage("tokenizer", lambda d: train_tokenizer(recipe.tokenizer, data, recipe.base_dir, d))
    stage("data", lambda d: prepare.run(data, out / "tokenizer", recipe.base_dir, d))
    stage(
        "pretrain",
        lambda d: pretrain.run(recipe.pretrain, recipe.model, out / "data", out / "tokenizer", d),
    )
    return output_dir(out, "pretrain", lora_r=0)


def _quantize_all(recipe: Recipe, model_dir: Path, data_dir: Path, d: Path, log) -> dict:
    """Quantize the run's final model once per `quantize.methods` entry into d/<name>; a LoRA
    adapter is merged into its base first (d/merged)."""
    from lmforge.compress import quantize
    from lmforge.model.load import model_source

    if model_source(model_dir) != model_dir:
        from lmforge.model.lora import export_merged

        merged = d / "merged"
        if not (merged / "model.safetensors").is_file():
            export_merged(model_dir, merged)
        model_dir = merged
    done = {}
    for method in recipe.quantize.methods:
        cfg = dataclasses.replace(recipe.quantize, method=method)
        name = quantize.output_name(cfg)
        if (d / name / "summary.json").is_file():  # finished before an interruption
            summary = read_json(d / name / "summary.json", "quantize summary")
        else:
            summary = quantize.run(cfg, model_dir, data_dir, d)
            log(f"[quantize] {name}: {summary['headline']}")
        done[summary["name"]] = {k: summary[k] for k in ("file_bytes", "val_before", "val_after")}
    return {"models": done}
