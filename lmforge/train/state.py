"""Training checkpoints: a HF model directory plus `trainer_state/` (optimizer, step, RNG, data
position), written atomically, the newest K kept; and the start of a run in its folder.

The one idea: resuming must reproduce the uninterrupted run bit for bit, so everything that
feeds the next step is saved — weights (exact fp32 safetensors), optimizer moments, the data
loader's position, every RNG and the loss summed since the last metrics line — and nothing
else is needed to continue. state.json lists every file of its checkpoint with its size, so a
checkpoint that lost a file (a kill while an older version deleted it) is never resumed from.

A run folder remembers the config that made it (`run_config.json`): a rerun with other
settings, or with resume off, is refused instead of silently continuing or overwriting it,
unless `overwrite` moves the old run aside.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import sys
from pathlib import Path

import numpy as np
import torch

from lmforge.config import RUNTIME_FIELDS, SECTIONS, ConfigError
from lmforge.io import (
    atomic_dir,
    move_aside,
    read_json,
    remove_dir,
    remove_temporaries,
    write_json,
)
from lmforge.model.checkpoint import _read_tensors, save_model
from lmforge.model.hf import from_hf_state_dict
from lmforge.train import dist

STEP_DIR = re.compile(r"^step_(\d+)$")
RUN_CONFIG = "run_config.json"


def rng_state() -> tuple[dict, dict]:
    """Every RNG as (tensors, json-able scalars), so it reloads with weights_only=True."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    tensors = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
    }
    if torch.cuda.is_available():
        tensors.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    scalars = {
        "numpy": [kind, pos, has_gauss, gauss],
        "python": [version, list(py_state), py_gauss],
    }
    return tensors, scalars


def set_rng_state(tensors: dict, scalars: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    kind, pos, has_gauss, gauss = scalars["numpy"]
    np.random.set_state(
        (kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss)
    )
    version, py_state, py_gauss = scalars["python"]
    random.setstate((version, tuple(py_state), py_gauss))
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(
    ckpt_dir: str | Path,
    model,
    optimizer,
    step: int,
    loader_state: dict,
    tokenizer_dir=None,
    extra: dict | None = None,
    pad_token_id: int | None = None,
    write_weights=None,
) -> Path:
    """Write model + trainer_state into ckpt_dir atomically; returns the final path.
    `write_weights(dir)` replaces the full model save (LoRA writes only its adapter)."""
    ckpt_dir = Path(ckpt_dir)
    with atomic_dir(ckpt_dir) as tmp:
        if write_weights is None:
            save_model(model, tmp, tokenizer_dir, pad_token_id=pad_token_id)
        else:
            write_weights(tmp)
        ts = tmp / "trainer_state"
        ts.mkdir()
        torch.save(optimizer.state_dict(), ts / "optimizer.pt")
        rng_tensors, rng_scalars = rng_state()
        torch.save(rng_tensors, ts / "rng.pt")
        state = {"step": step, "loader": loader_state, "rng": rng_scalars, **(extra or {})}
        write_json(ts / "state.json", state | {"files": file_sizes(tmp)})
    return ckpt_dir


def file_sizes(root: Path) -> dict[str, int]:
    """Every file under root (relative path -> bytes): written into state.json last, so that
    a checkpoint can tell it is whole."""
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def is_complete(ckpt_dir: Path) -> bool:
    """state.json is there and every file it lists has its size (checkpoints written before
    the list existed count as complete when they have a state.json)."""
    try:
        state = read_json(ckpt_dir / "trainer_state" / "state.json", "trainer state")
    except (FileNotFoundError, ValueError):
        return False
    for rel, size in state.get("files", {}).items():
        p = ckpt_dir / rel
        if not p.is_file() or p.stat().st_size != size:
            return False
    return True


def load_checkpoint(ckpt_dir: str | Path, model, optimizer=None, read_weights=None) -> dict:
    """Restore weights (and optimizer and RNG when given) in place; returns state.json.
    `read_weights(dir)` replaces the full model load (the counterpart of write_weights)."""
    ckpt_dir = Path(ckpt_dir)
    if read_weights is None:
        sd = from_hf_state_dict(_read_tensors(ckpt_dir), model.cfg)
        model.load_state_dict(sd, strict=True)
    else:
        read_weights(ckpt_dir)
    ts = ckpt_dir / "trainer_state"
    state = read_json(ts / "state.json", "trainer state")
    if optimizer is not None:
        optimizer.load_state_dict(
            torch.load(ts / "optimizer.pt", weights_only=True, map_location="cpu")
        )
        set_rng_state(torch.load(ts / "rng.pt", weights_only=True), state["rng"])
    return state


def step_dirs(root: str | Path) -> list[Path]:
    """Every step_N folder under root, complete or not, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()
    ]
    return [p for _, p in sorted(found)]


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete step checkpoints under root, oldest first (temporaries are never listed)."""
    return [p for p in step_dirs(root) if is_complete(p)]


def prune_checkpoints(root: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, each renamed away first: a kill midway
    leaves a trash folder, never a step_N with files missing."""
    for p in list_checkpoints(root)[:-keep]:
        remove_dir(p)


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


def resume_latest(ckpt_root: str | Path, model, optimizer, loader, resume: bool = True) -> dict:
    """Load the newest step checkpoint under ckpt_root into model, optimizer and loader (when
    resume is on and there is one) and return its state.json; {} for a fresh start."""
    existing = list_checkpoints(ckpt_root) if resume else []
    if not existing:
        return {}
    state = load_checkpoint(existing[-1], model, optimizer)
    loader.load_state_dict(state["loader"])
    print(f"resuming from {existing[-1]} (step {state['step']})", file=sys.stderr)
    return state


# --------------------------------------------------------------------------- the run folder


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
