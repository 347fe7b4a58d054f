"""PackedLoader: batches are a pure function of (seed, position); ranks and epochs tile the data."""

import json

import numpy as np
import pytest
import torch

from lmforge.data.loader import PackedLoader, val_batches, val_languages
from lmforge.data.readers import DataError


def write_data(d, shard_sizes=(1000, 700, 333), val=None):
    """Shards whose token values say where they are: shard s, offset i -> 10_000 * s + i."""
    d.mkdir(exist_ok=True)
    shards = []
    for s, n in enumerate(shard_sizes):
        (10_000 * s + np.arange(n, dtype=np.uint32)).tofile(d / f"train_{s:03d}.bin")
        shards.append({"file": f"train_{s:03d}.bin", "docs": 1, "tokens": n})
    vals = {}
    for lang, n in (val or {}).items():
        np.arange(n, dtype=np.uint32).tofile(d / f"val_{lang}.bin")
        vals[lang] = {"file": f"val_{lang}.bin", "docs": 1, "tokens": n, "bytes": 3 * n}
    manifest = {"dtype": "uint32", "vocab_size": 70_000, "train_shards": shards, "val": vals}
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


@pytest.fixture
def data(tmp_path):
    return write_data(tmp_path / "data")


def test_shapes_shift_and_windows_stay_in_one_shard(data):
    loader = PackedLoader(data, seq_len=16, batch_size=8, seed=0)
    for _ in range(20):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        full = torch.cat([x, y[:, -1:]], dim=1)
        # consecutive values from a single shard: the window never crossed a shard boundary
        assert (full.diff(dim=1) == 1).all()


def test_same_seed_and_position_same_batch_in_a_new_instance(data):
    a = PackedLoader(data, seq_len=16, batch_size=4, seed=7)
    b = PackedLoader(data, seq_len=16, batch_size=4, seed=7)
    for pos in (0, 4, 123, 10_000):
        assert all(torch.equal(u, v) for u, v in zip(a.batch_at(pos), b.batch_at(pos)))
    c = PackedLoader(data, seq_len=16, batch_size=4, seed=8)
    assert not torch.equal(a.batch_at(0)[0], c.batch_at(0)[0])


def test_resume_gives_the_uninterrupted_next_batch(data):
    straight = PackedLoader(data, seq_len=16, batch_size=4, seed=3, rank=1, world_size=2)
    for _ in range(37):
        straight.next_batch()
    state = straight.state_dict()
    assert state == {"position": 37 * 8, "seed": 3, "seq_len": 16}
    resumed = PackedLoader(data, seq_len=16, batch_size=4, seed=3, rank=1, world_size=2)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    for _ in range(5):
        assert all(torch.equal(u, v) for u, v in zip(straight.next_batch(), resumed.next_batch()))
    with pytest.raises(ValueError, match="seed=4"):
        resumed.load_state_dict({**state, "seed": 4})
    with pytest.raises(ValueError, match="seq_len=32"):
        resumed.load_state_dict({**state, "seq_len": 32})


def test_ranks_split_the_global_batch(data):
    whole = PackedLoader(data, seq_len=16, batch_size=6, seed=1)
    ranks = [
        PackedLoader(data, seq_len=16, batch_size=3, seed=1, rank=r, world_size=2) for r in (0, 1)
    ]
    for _ in range(30):  # crosses epoch boundaries too
        x, _ = whole.next_batch()
        parts = [r.next_batch()[0] for r in ranks]
        assert torch.equal(torch.cat(parts), x)
        starts = [set(p[:, 0].tolist()) for p in parts]
        assert not starts[0] & starts[1]
    assert ranks[0].position == whole.position


def test_epochs_cover_every_window_once_and_move_the_cuts(data):
    loader = PackedLoader(data, seq_len=16, batch_size=1, seed=5)
    n = loader.n_windows
    # (1000 - 16) // 17 + (700 - 16) // 17 + (333 - 16) // 17 windows
    assert n == 57 + 40 + 18
    offsets = set()
    for epoch in range(4):
        assert loader.epoch == epoch
        starts = [int(loader.next_batch()[0][0, 0]) for _ in range(n)]
        assert len(set(starts)) == n  # every window once
        for s in (0, 1, 2):  # windows of a shard are disjoint, evenly spaced, one shared offset
            mine = sorted(v - 10_000 * s for v in starts if v // 10_000 == s)
            assert set(np.diff(mine)) == {17}
            offsets.add(mine[0])
    assert len(offsets) > 1  # the cut points moved between epochs


def test_too_little_data_is_an_error(tmp_path):
    d = write_data(tmp_path / "small", shard_sizes=(10, 12))
    with pytest.raises(DataError, match="22 tokens in 2 shard.*seq_len \\+ 1 = 17"):
        PackedLoader(d, seq_len=16, batch_size=2, seed=0)
    assert PackedLoader(d, seq_len=11, batch_size=2, seed=0).n_windows == 1  # only 12 >= 12
    with pytest.raises(DataError, match="manifest.json is missing"):
        PackedLoader(tmp_path, seq_len=16, batch_size=2, seed=0)


def test_val_batches(tmp_path):
    d = write_data(tmp_path / "d", val={"zh": 100, "en": 40})
    assert val_languages(d) == ["en", "zh"]
    batches = list(val_batches(d, "zh", seq_len=8, batch_size=5, max_tokens=0))
    # (100 - 1) // 8 = 12 windows -> batches of 5, 5, 2
    assert [x.shape[0] for x, _ in batches] == [5, 5, 2]
    y = torch.cat([y for _, y in batches]).flatten()
    assert torch.equal(y, torch.arange(1, 97))  # every target once, in order
    x = torch.cat([x for x, _ in batches]).flatten()
    assert torch.equal(x, torch.arange(0, 96))
    capped = list(val_batches(d, "zh", seq_len=8, batch_size=5, max_tokens=20))
    assert sum(y.numel() for _, y in capped) == 16
    with pytest.raises(DataError, match="no validation file for language 'fr' \\(have: en, zh\\)"):
        list(val_batches(d, "fr", 8, 5, 0))


def test_uint16_shards_and_real_prepare_layout(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    np.arange(5000, dtype=np.uint16).tofile(d / "train_000.bin")
    manifest = {"dtype": "uint16", "train_shards": [{"file": "train_000.bin"}], "val": {}}
    (d / "manifest.json").write_text(json.dumps(manifest))
    x, y = PackedLoader(d, seq_len=64, batch_size=4, seed=0).next_batch()
    assert x.dtype == torch.int64 and (x < 5000).all()
    assert val_languages(d) == []
