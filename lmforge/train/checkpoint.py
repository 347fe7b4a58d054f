"""Training checkpoints, for one process and for sharded runs alike: a Hugging Face model
directory plus `trainer_state/` (optimizer, step, RNG, data position), written atomically as
`checkpoints/step_N`, the newest K kept.

The one idea: resuming must reproduce the uninterrupted run bit for bit, so everything that
feeds the next step is saved — weights (exact fp32 safetensors), optimizer moments, the data
position, every RNG, the logging sums of the training clock and a stage's extras (a value
head, a KL coefficient) — and nothing else is needed to continue. state.json lists every file
of its checkpoint with its size, so a checkpoint that lost a file is never resumed from.

Sharded training (FSDP2, tensor parallel) goes through torch.distributed.checkpoint: every rank
writes only its own shards (`dcp/`), with the tp degree they were laid out for recorded beside
them, so a checkpoint resumes with any number of processes and any strategy (DCP reshards on
load, and the fused projections' rows are reordered from the saved tp layout to the current
one). Nothing is gathered on one rank except for the final export.

Stages call three functions: `save_step`, `resume_latest` and `save_final` (all ranks call
them); `list_checkpoints` finds what is there. No stage spells a checkpoint's folder name.
"""

from __future__ import annotations

import random
import re
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from lmforge.config import ConfigError
from lmforge.io import atomic_dir, read_json, remove_dir, replace_dir, write_json
from lmforge.model.checkpoint import load_config, read_tensors, save_extras, save_model
from lmforge.model.hf import from_hf_state_dict, to_hf_config
from lmforge.model.transformer import GPT
from lmforge.train import dist
from lmforge.train.optim import param_groups

# one process reading a sharded checkpoint is the intent here, not a mistake to warn about
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")

STEP_DIR = re.compile(r"^step_(\d+)$")


def step_name(step: int) -> str:
    """The folder name of step `step`'s checkpoint (sorted by name = sorted by step)."""
    return f"step_{step:06d}"


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
    modules: dict | None = None,
) -> Path:
    """Write model + trainer_state into ckpt_dir atomically; returns the final path.
    `write_weights(dir)` replaces the full model save (LoRA writes only its adapter);
    `modules` {name: nn.Module} ride along as `<name>.safetensors` (PPO's value head)."""
    ckpt_dir = Path(ckpt_dir)
    with atomic_dir(ckpt_dir) as tmp:
        if write_weights is None:
            save_model(model, tmp, tokenizer_dir, pad_token_id=pad_token_id)
        else:
            write_weights(tmp)
        for name, module in (modules or {}).items():
            tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
            save_file(tensors, str(tmp / f"{name}.safetensors"))
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


def load_checkpoint(
    ckpt_dir: str | Path, model, optimizer=None, read_weights=None, modules: dict | None = None
) -> dict:
    """Restore weights (and optimizer and RNG when given) in place; returns state.json.
    `read_weights(dir)` replaces the full model load (the counterpart of write_weights);
    `modules` are loaded from the files save_checkpoint wrote for them."""
    ckpt_dir = Path(ckpt_dir)
    if read_weights is None:
        sd = from_hf_state_dict(read_tensors(ckpt_dir), model.cfg)
        model.load_state_dict(sd, strict=True)
    else:
        read_weights(ckpt_dir)
    for name, module in (modules or {}).items():
        device = str(next(module.parameters()).device)
        module.load_state_dict(load_file(str(ckpt_dir / f"{name}.safetensors"), device=device))
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


# --------------------------------------------------------------------------- sharded and unified


def is_sharded(ckpt_dir: str | Path) -> bool:
    return (Path(ckpt_dir) / "dcp").is_dir()


def save_sharded(
    ckpt_dir: str | Path,
    model,
    optimizer,
    step: int,
    loader_state: dict,
    info: dist.DistInfo,
    tokenizer_dir=None,
    pad_token_id: int | None = None,
    extra: dict | None = None,
) -> Path:
    """Every rank writes its shards into a temporary directory beside ckpt_dir; rank 0 adds the
    trainer state and renames it into place once all ranks are done (all ranks call this)."""
    ckpt_dir = Path(ckpt_dir)
    tmp = ckpt_dir.with_name(f".{ckpt_dir.name}.tmp-dcp")
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier(info)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    # only the moments: the groups' settings come from the recipe, and their split (see
    # make_optimizer) depends on the strategy
    dcp.save({"model": model_sd, "optim": optim_sd["state"]}, checkpoint_id=tmp / "dcp")
    dist.barrier(info)  # every shard is on disk
    if info.is_main:
        cfg = model.cfg
        write_json(tmp / "config.json", to_hf_config(cfg, pad_token_id=pad_token_id))
        save_extras(cfg, tmp, tokenizer_dir, pad_token_id)
        ts = tmp / "trainer_state"
        ts.mkdir()
        rng_tensors, rng_scalars = rng_state()
        torch.save(rng_tensors, ts / "rng.pt")
        layout = {"tp": info.tp, "world_size": info.world_size, "strategy": info.strategy}
        state = {"step": step, "loader": loader_state, "rng": rng_scalars, "layout": layout}
        write_json(ts / "state.json", state | (extra or {}) | {"files": file_sizes(tmp)})
        replace_dir(tmp, ckpt_dir)
    dist.barrier(info)
    return ckpt_dir


def relayout(model, optimizer, from_tp: int, to_tp: int) -> None:
    """Reorder the rows of the fused projections (and of their optimizer moments) from the
    layout for `from_tp` tensor-parallel ranks to the one for `to_tp`."""
    for name, p in model.named_parameters():
        index = dist.relayout_index(model.cfg, name, from_tp, to_tp)
        if index is None:
            continue
        dist.take_rows(p.data, index)
        state = optimizer.state.get(p, {}) if optimizer is not None else {}
        for v in state.values():
            if torch.is_tensor(v) and v.shape == p.shape:
                dist.take_rows(v, index)


def load_sharded(ckpt_dir: str | Path, model, optimizer, info: dist.DistInfo) -> dict:
    """Load a DCP checkpoint into `model` and `optimizer`, however they are distributed now
    (DCP reads the slices each rank needs); returns state.json."""
    ckpt_dir = Path(ckpt_dir)
    state = read_json(ckpt_dir / "trainer_state" / "state.json", "trainer state")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.load({"model": model_sd, "optim": optim_sd["state"]}, checkpoint_id=ckpt_dir / "dcp")
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    relayout(model, optimizer, state["layout"]["tp"], info.tp)
    set_rng_state(
        torch.load(ckpt_dir / "trainer_state" / "rng.pt", weights_only=True), state["rng"]
    )
    return state


def load_whole_into_sharded(ckpt_dir: str | Path, model, optimizer, info: dist.DistInfo) -> dict:
    """Load a single-process (or DDP) checkpoint into a sharded model and its optimizer: every
    rank reads the whole file and keeps its own slices."""
    ckpt_dir = Path(ckpt_dir)
    full = from_hf_state_dict(read_tensors(ckpt_dir), model.cfg)
    params = dict(model.named_parameters())
    for name, p in params.items():
        index = dist.relayout_index(model.cfg, name, 1, info.tp)
        dist.assign(p, full[name] if index is None else full[name][index])
    # a single process keys optimizer state by each parameter's position in its two groups
    # (param_groups' order); here a group may be split in two, so the state goes by name
    state = read_json(ckpt_dir / "trainer_state" / "state.json", "trainer state")
    saved = torch.load(
        ckpt_dir / "trainer_state" / "optimizer.pt", weights_only=True, map_location="cpu"
    )
    order = [n for group in param_groups(model, 0.0) for n in group["names"]]
    for i, moments in saved["state"].items():
        name = order[int(i)]
        p, index = params[name], dist.relayout_index(model.cfg, name, 1, info.tp)
        for k, v in moments.items():
            if k == "step":
                moments[k] = v.to(p.device)
            else:
                moments[k] = torch.empty_like(p)
                dist.assign(moments[k], v if index is None else v[index])
        optimizer.state[p] = moments
    set_rng_state(
        torch.load(ckpt_dir / "trainer_state" / "rng.pt", weights_only=True), state["rng"]
    )
    return state


def resume_latest(
    ckpt_root,
    model,
    optimizer,
    loader=None,
    resume: bool = True,
    info=None,
    read_weights=None,
    modules: dict | None = None,
) -> dict:
    """Resume from the newest step checkpoint under ckpt_root, whichever strategy and number of
    processes wrote it; returns its state.json ({} for a fresh start). All ranks call this. `loader`
    (None when the step alone places the data) gets its saved position back; `read_weights`
    and `modules` are load_checkpoint's (a LoRA adapter; a value head)."""
    info = info or dist.DistInfo()
    existing = list_checkpoints(ckpt_root) if resume else []
    if not existing:
        return {}
    latest = existing[-1]
    if is_sharded(latest):
        state = load_sharded(latest, model, optimizer, info)
    elif info.sharded:
        state = load_whole_into_sharded(latest, model, optimizer, info)
    else:
        state = load_checkpoint(latest, model, optimizer, read_weights, modules)
    if loader is not None:
        loader.load_state_dict(state["loader"])
    if info.is_main:
        print(f"resuming from {latest} (step {state['step']})", file=sys.stderr)
    return state


def save_step(
    ckpt_root: Path,
    step: int,
    model,
    optimizer,
    loader_state: dict,
    info: dist.DistInfo | None,
    keep_last: int,
    tokenizer_dir=None,
    pad_token_id: int | None = None,
    write_weights=None,
    extra: dict | None = None,
    modules: dict | None = None,
) -> None:
    """A step checkpoint, then the oldest pruned (all ranks call this). Sharded training: every
    rank writes its own shards; otherwise every rank holds the same state and rank 0 writes it
    (`write_weights`, `modules` and `extra`, more for state.json, as in save_checkpoint)."""
    info = info or dist.DistInfo()
    where = Path(ckpt_root) / step_name(step)
    if info.sharded and modules:
        raise ConfigError("a sharded checkpoint cannot carry extra modules")
    if info.sharded:
        save_sharded(
            where, model, optimizer, step, loader_state, info, tokenizer_dir, pad_token_id, extra
        )
    elif info.is_main:
        save_checkpoint(
            where, model, optimizer, step, loader_state, tokenizer_dir, extra=extra,
            pad_token_id=pad_token_id, write_weights=write_weights, modules=modules,
        )  # fmt: skip
    if info.is_main:
        prune_checkpoints(ckpt_root, keep_last)
    dist.barrier(info)


def save_final(
    model, out_dir: str | Path, info: dist.DistInfo | None = None, **save_kwargs
) -> None:
    """The trained model in the single-directory HF layout (all ranks call this). A sharded
    model's full weights are gathered on rank 0 through CPU memory, one tensor at a time."""
    info = info or dist.DistInfo()
    if info.sharded:
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(model, options=opts)
        if info.is_main:
            plain = GPT(model.cfg)
            plain.load_state_dict(full)
            _write_plain(plain, info.tp, out_dir, **save_kwargs)
    elif info.is_main:
        with atomic_dir(out_dir) as tmp:
            save_model(model, tmp, **save_kwargs)
    dist.barrier(info)


def _write_plain(plain: GPT, tp: int, out_dir, **save_kwargs) -> None:
    """Write a whole (unsharded) model whose fused rows are laid out for `tp` ranks."""
    relayout(plain, None, tp, 1)
    with atomic_dir(out_dir) as tmp:
        save_model(plain, tmp, **save_kwargs)


def export(ckpt_dir: str | Path, out_dir: str | Path) -> Path:
    """A sharded step checkpoint -> a single-directory HF model (one process, no torchrun)."""
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    if not is_sharded(ckpt_dir):
        raise ConfigError(f"{ckpt_dir} has no dcp/ folder: it is not a sharded checkpoint")
    if out_dir.exists():
        raise ConfigError(f"{out_dir} already exists; choose a new output directory")
    cfg = load_config(ckpt_dir)
    state = read_json(ckpt_dir / "trainer_state" / "state.json", "trainer state")
    model = GPT(cfg)
    model_sd = get_model_state_dict(model)
    dcp.load({"model": model_sd}, checkpoint_id=ckpt_dir / "dcp")
    set_model_state_dict(model, model_sd)
    pad = read_json(ckpt_dir / "config.json", "checkpoint config").get("pad_token_id")
    _write_plain(model, state["layout"]["tp"], out_dir, tokenizer_dir=ckpt_dir, pad_token_id=pad)
    return out_dir
