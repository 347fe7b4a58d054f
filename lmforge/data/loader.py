"""Packed, shuffled, resumable training batches read straight from the token shards (np.memmap).

The one idea: a batch is a pure function of (seed, position), where position counts the global
samples consumed so far. Each shard is cut into windows of seq_len + 1 tokens (documents packed end
to end, separated by their BOS/EOS); every epoch shuffles all windows with an rng seeded by
(seed, epoch) and shifts the cut points by a random offset, so the model does not see the same
token pairs at window edges every epoch. Resuming is restoring one integer, in any process, with
any number of ranks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from lmforge.data.readers import DataError


def read_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise DataError(
            f"no prepared data in {data_dir}: {path} is missing (run `lmforge prepare`)"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None


def memmap_tokens(data_dir: Path, file: str, dtype: np.dtype) -> np.ndarray:
    path = data_dir / file
    if not path.is_file():
        raise DataError(f"{path} is listed in manifest.json but missing")
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)  # np.memmap refuses empty files
    return np.memmap(path, dtype=dtype, mode="r")


class PackedLoader:
    """Batches (x, y) of shape (B, T) for one rank; y is x shifted left by one token."""

    def __init__(
        self, data_dir, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ):
        assert 0 <= rank < world_size, f"rank {rank} is outside world_size {world_size}"
        assert seq_len > 0 and batch_size > 0, "seq_len and batch_size must be positive"
        data_dir = Path(data_dir)
        manifest = read_manifest(data_dir)
        dtype = np.dtype(manifest["dtype"])
        self.shards = [memmap_tokens(data_dir, e["file"], dtype) for e in manifest["train_shards"]]
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.position = 0  # global samples consumed (all ranks)

        # --- windows: the same count every epoch, so sample i -> (i // N, i % N) needs no table
        W = seq_len + 1
        n = np.array([len(s) for s in self.shards], dtype=np.int64)
        # keep seq_len tokens of slack for the epoch offset, but never drop a shard's only window
        per_shard = np.where(n >= W, np.maximum(1, (n - seq_len) // W), 0)
        self._slack = n - per_shard * W  # room to shift the first window right
        self._first = np.concatenate([[0], np.cumsum(per_shard)])  # first window id of each shard
        self.n_windows = int(self._first[-1])  # windows per epoch
        if self.n_windows == 0:
            raise DataError(
                f"{data_dir}: the train shards hold {int(n.sum())} tokens in {len(n)} shard(s), "
                f"fewer than one window of seq_len + 1 = {W} tokens in any shard"
            )
        self._epochs: dict[int, tuple[np.ndarray, int]] = {}

    def _epoch(self, epoch: int) -> tuple[np.ndarray, int]:
        """(window permutation, cut offset) of an epoch, from an rng seeded by (seed, epoch)."""
        if epoch not in self._epochs:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(self.n_windows)
            offset = int(rng.integers(self.seq_len))
            if len(self._epochs) >= 2:  # a batch spans at most two epochs
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = (perm, offset)
        return self._epochs[epoch]

    def batch_at(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's batch when `position` global samples have been consumed. Pure in
        (seed, position, rank): the same call gives the same batch in any process."""
        B, W = self.batch_size, self.seq_len + 1
        sample = position + self.rank * B + np.arange(B, dtype=np.int64)  # global sample ids
        epoch, j = np.divmod(sample, self.n_windows)
        window = np.empty(B, dtype=np.int64)
        offset = np.empty(B, dtype=np.int64)
        for e in np.unique(epoch):
            perm, off = self._epoch(int(e))
            m = epoch == e
            window[m], offset[m] = perm[j[m]], off
        shard = np.searchsorted(self._first, window, side="right") - 1
        start = offset % (self._slack[shard] + 1) + (window - self._first[shard]) * W
        tokens = np.empty((B, W), dtype=np.int64)  # (B, T+1)
        for s in np.unique(shard):  # one vectorised gather per shard touched
            m = shard == s
            tokens[m] = self.shards[s][start[m, None] + np.arange(W)]
        x = torch.from_numpy(np.ascontiguousarray(tokens[:, :-1]))  # (B, T)
        y = torch.from_numpy(np.ascontiguousarray(tokens[:, 1:]))  # (B, T)
        return x, y

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.batch_at(self.position)
        self.position += self.batch_size * self.world_size
        return batch

    @property
    def epoch(self) -> int:
        return self.position // self.n_windows

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state["position"]`; the batch size and world size may differ from before,
        but seed and seq_len define the sample order, so they must match."""
        for key in ("seed", "seq_len"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"loader state has {key}={state[key]}, this loader has {key}={getattr(self, key)}: "
                    "resuming would replay a different sample order"
                )
        self.position = int(state["position"])


def replay_rows(batch_size: int, fraction: float) -> int:
    """Rows of each batch taken from the replay data: round(fraction * batch_size), halves up.
    Off at fraction 0; otherwise at least one row, and at least one left for the main data."""
    rows = int(fraction * batch_size + 0.5)
    if fraction > 0 and not 0 < rows < batch_size:
        raise DataError(
            f"pretrain.replay_fraction {fraction} of batch_size {batch_size} makes {rows} replay "
            f"rows: choose a fraction and batch size that give between 1 and {batch_size - 1}"
        )
    return rows


class ReplayLoader:
    """Batches whose first rows come from the main data and whose last `rows` come from a second
    folder of general text (replay, against forgetting what the model knew). Two PackedLoaders,
    each a pure function of its own position, so the mix is as deterministic and resumable as
    one loader."""

    def __init__(self, main: PackedLoader, replay: PackedLoader):
        self.main, self.replay = main, replay

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        (x, y), (rx, ry) = self.main.next_batch(), self.replay.next_batch()
        return torch.cat([x, rx]), torch.cat([y, ry])  # (B, T)

    def state_dict(self) -> dict:
        return {**self.main.state_dict(), "replay": self.replay.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "replay" not in state:
            raise ValueError("the checkpoint's loader state has no replay position")
        self.main.load_state_dict(state)
        self.replay.load_state_dict(state["replay"])


def val_languages(data_dir: str | Path) -> list[str]:
    """Languages with a validation file, sorted."""
    return sorted(lang for lang, e in read_manifest(data_dir).get("val", {}).items() if e["tokens"])


def val_batches(
    data_dir: str | Path, lang: str, seq_len: int, batch_size: int, max_tokens: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive windows of the `lang` validation file, in order, up to max_tokens targets
    (0 = all). Windows start seq_len apart, so each token after the first is a target exactly once;
    a last partial window is dropped to keep shapes fixed."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    val = manifest.get("val", {})
    if lang not in val:
        raise DataError(
            f"{data_dir}: no validation file for language {lang!r} (have: {', '.join(sorted(val))})"
        )
    tokens = memmap_tokens(data_dir, val[lang]["file"], np.dtype(manifest["dtype"]))
    n_windows = max(len(tokens) - 1, 0) // seq_len
    if max_tokens > 0:
        n_windows = min(n_windows, max(1, max_tokens // seq_len))
    cols = np.arange(seq_len + 1)
    for first in range(0, n_windows, batch_size):
        starts = np.arange(first, min(first + batch_size, n_windows)) * seq_len
        chunk = tokens[starts[:, None] + cols].astype(np.int64)  # (B, T+1)
        yield torch.from_numpy(chunk[:, :-1].copy()), torch.from_numpy(chunk[:, 1:].copy())
