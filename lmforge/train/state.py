"""Training checkpoints: a HF model directory plus `trainer_state/` (optimizer, step, RNG, data
position), written atomically, the newest K kept.

The one idea: resuming must reproduce the uninterrupted run bit for bit, so everything that
feeds the next step is saved — weights (exact fp32 safetensors), optimizer moments, the data
loader's position and every RNG — and nothing else is needed to continue.
"""

from __future__ import annotations

import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from lmforge.io import atomic_dir, read_json, write_json
from lmforge.model.checkpoint import _read_tensors, save_model
from lmforge.model.hf import from_hf_state_dict

STEP_DIR = re.compile(r"^step_(\d+)$")


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
        write_json(
            ts / "state.json",
            {"step": step, "loader": loader_state, "rng": rng_scalars, **(extra or {})},
        )
    return ckpt_dir


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


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete step checkpoints under root, oldest first (temporaries are never listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()
    ]
    return [p for _, p in sorted(found) if (p / "trainer_state" / "state.json").exists()]


def prune_checkpoints(root: str | Path, keep: int) -> None:
    for p in list_checkpoints(root)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def resume_latest(ckpt_root: str | Path, model, optimizer, loader, resume: bool = True) -> int:
    """Load the newest step checkpoint under ckpt_root into model, optimizer and loader (when
    resume is on and there is one) and return its step; 0 for a fresh start."""
    existing = list_checkpoints(ckpt_root) if resume else []
    if not existing:
        return 0
    state = load_checkpoint(existing[-1], model, optimizer)
    loader.load_state_dict(state["loader"])
    print(f"resuming from {existing[-1]} (step {state['step']})", file=sys.stderr)
    return state["step"]
