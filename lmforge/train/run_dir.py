"""A run's folder: the config that made it (`run_config.json`), checked before a run starts.

The one idea: a rerun with other settings, or with resume off, is refused instead of silently
continuing or overwriting the run there, unless `overwrite` moves the old run aside; what a
killed run left (temporaries, incomplete checkpoints) is cleared before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

from lmforge.config import RUNTIME_FIELDS, SECTIONS, ConfigError
from lmforge.io import move_aside, read_json, remove_dir, remove_temporaries, write_json
from lmforge.train import dist
from lmforge.train.checkpoint import is_complete, list_checkpoints, step_dirs

RUN_CONFIG = "run_config.json"


def clean_run_dir(out_dir: str | Path) -> list[str]:
    """What a killed run left in out_dir and its checkpoints: temporaries, trash, and step
    folders that are not whole (a kill while an older lmforge deleted them). Returns what was
    done. Call it before anything else writes there (under torchrun: rank 0, then a barrier)."""
    out_dir = Path(out_dir)
    done = remove_temporaries(out_dir)
    done += remove_temporaries(out_dir / "checkpoints")
    for p in step_dirs(out_dir / "checkpoints"):
        if not is_complete(p):
            remove_dir(p)
            done.append(f"removed incomplete checkpoint {p.name}")
    return done


def run_config(cfg, *sections, dp_size: int = 1, **inputs) -> dict:
    """What defines a run, as run_config.json stores it: the stage's config (and other config
    sections it uses, e.g. the model or LoRA) as dicts keyed by section name, and its input
    folders as absolute paths. The stage's section gains `global_batch` (batch_size x
    grad_accum x dp_size data-parallel ranks): that, not its split, is what a resume keeps."""
    out = {_section(c): dataclasses.asdict(c) for c in (cfg, *sections) if c is not None}
    main = out[_section(cfg)]
    if "batch_size" in main:
        main["global_batch"] = main["batch_size"] * main.get("grad_accum", 1) * dp_size
    out |= {k: str(Path(v).resolve()) for k, v in inputs.items() if v is not None}
    return json.loads(json.dumps(out, default=str))  # tuples -> lists, as read back


def _section(cfg) -> str:
    return next((k for k, v in SECTIONS.items() if type(cfg) is v), type(cfg).__name__)


def config_changes(old: dict, new: dict) -> list[str]:
    """'lr: 0.0002 -> 0.0083' for each setting that differs, runtime options and max_steps
    (see config.RUNTIME_FIELDS) left out, and the split of the global batch: resuming on
    another number of ranks, or with more gradient accumulation to save memory, is fine."""
    free = set(RUNTIME_FIELDS) | {"max_steps", "batch_size", "grad_accum"}
    flat_old, flat_new = _flatten(old), _flatten(new)
    return [
        f"{k}: {flat_old.get(k, '(unset)')} -> {flat_new.get(k, '(unset)')}"
        for k in sorted(flat_old.keys() | flat_new.keys())
        if k.rsplit(".", 1)[-1] not in free and flat_old.get(k) != flat_new.get(k)
    ]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def previous_outputs(out_dir: Path) -> list[str]:
    """What an earlier run left in out_dir that a new one would overwrite or prune."""
    found = [f"checkpoint {p.name}" for p in list_checkpoints(out_dir / "checkpoints")[-1:]]
    found += [n for n in ("model", "adapter", "baseline", "summary.json") if (out_dir / n).exists()]
    return found


def check_run_dir(out_dir: Path, stage: str, config: dict, resume: bool) -> str | None:
    """Why a run with `config` must not start in out_dir (None when it may): an earlier run
    there had other settings, or resume is off and the earlier run's outputs would be lost."""
    previous = previous_outputs(out_dir)
    if not previous:
        return None
    rerun = (
        f" (lmforge run: --force {stage})" if stage in ("pretrain", "sft", "reward", "dpo") else ""
    )
    fix = f"pass --overwrite to move the old run aside to {out_dir.name}.old{rerun}, or choose another --out"
    try:
        old = read_json(out_dir / RUN_CONFIG, "run config")["config"]
    except (FileNotFoundError, ValueError, KeyError):
        old = None  # a run from before run_config.json: nothing to compare with
    changes = config_changes(old, config) if old is not None else []
    if changes:
        return (
            f"{stage}: {out_dir} holds a run with other settings ({'; '.join(changes)}); "
            f"resuming would mix the two. Rerun with the old values, or {fix}"
        )
    if not resume:
        return (
            f"{stage}: {out_dir} already holds a run ({', '.join(previous)}) and {stage}.resume "
            f"is false, which would overwrite it; {fix}"
        )
    return None


def start_run(
    out_dir: str | Path,
    stage: str,
    config: dict,
    resume: bool,
    overwrite: bool,
    info: dist.DistInfo | None = None,
) -> None:
    """Get out_dir ready for a run of `config` (from run_config): refuse a folder that holds
    a different run (or any run, with resume off) unless `overwrite`, which moves it aside;
    clear what a killed run left; record the config. Under torchrun every rank checks, rank 0
    acts, and no rank goes on before it is done."""
    out_dir = Path(out_dir)
    info = info or dist.DistInfo()
    if not overwrite:
        problem = check_run_dir(out_dir, stage, config, resume)
        if problem:
            raise ConfigError(problem)
    dist.barrier(info)  # every rank has looked before anything moves
    if info.is_main:
        # `lmforge run` writes stage.json before the stage starts: that alone is no old run
        if overwrite and out_dir.exists() and set(os.listdir(out_dir)) - {"stage.json"}:
            moved = move_aside(out_dir)
            print(f"{stage}: previous run moved to {moved}", file=sys.stderr)
        out_dir.mkdir(parents=True, exist_ok=True)
        for line in clean_run_dir(out_dir):
            print(f"{stage}: {line} (left by an interrupted run)", file=sys.stderr)
        write_json(out_dir / RUN_CONFIG, {"stage": stage, "config": config})
    dist.barrier(info)
