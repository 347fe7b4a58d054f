"""Training checkpoints and run folders: a kill at any moment leaves nothing broken in view, and a
rerun never silently continues or overwrites a different run."""

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from lmforge.config import ConfigError, ModelConfig, PretrainConfig
from lmforge.io import write_json
from lmforge.model.transformer import GPT
from lmforge.train import checkpoint, run_dir
from lmforge.train.optim import make_optimizer


def _tiny():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=300, dim=32, n_layer=1, n_head=2, max_seq_len=16))
    return model, make_optimizer(model, PretrainConfig(), torch.device("cpu"))


def _save(root: Path, model, opt, step: int) -> Path:
    return checkpoint.save_checkpoint(root / f"step_{step:06d}", model, opt, step, {"pos": step})


def test_kill_during_pruning_leaves_no_broken_checkpoint(tmp_path, monkeypatch):
    model, opt = _tiny()
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        _save(root, model, opt, step)
    real_rmtree = shutil.rmtree

    def killed_rmtree(path, *args, **kwargs):  # deletes the weights, then the process "dies"
        (Path(path) / "model.safetensors").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.prune_checkpoints(root, keep=1)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    # every step_N still in view is whole: it loads
    visible = sorted(p for p in root.iterdir() if p.name.startswith("step_"))
    assert visible and visible[-1].name == "step_000003"
    for p in visible:
        checkpoint.load_checkpoint(p, _tiny()[0], _tiny()[1])
    # the next start clears the leftovers, and resuming takes the newest
    run_dir.clean_run_dir(tmp_path)
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    fresh, fresh_opt = _tiny()
    assert (
        checkpoint.load_checkpoint(checkpoint.list_checkpoints(root)[-1], fresh, fresh_opt)["step"]
        == 3
    )


def test_start_clears_temporaries_and_broken_checkpoints(tmp_path):
    model, opt = _tiny()
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        _save(root, model, opt, step)
    # made up for the test: what kills leave behind
    (root / ".step_000006.tmp-k1ll3d").mkdir()
    (root / ".step_000006.tmp-k1ll3d" / "model.safetensors").write_bytes(b"partial")
    (root / ".step_000001.trash-4242").mkdir()
    (tmp_path / ".model.tmp-abc_12").mkdir()
    (tmp_path / ".summary.json.tmp-999").write_text("{")
    half = shutil.copytree(root / "step_000004", root / "step_000006")  # an older lmforge's
    (half / "model.safetensors").unlink()  # half-finished prune: state.json still there
    unrelated = tmp_path / "notes.tmp-mine"  # not our pattern: left alone
    unrelated.write_text("keep")

    run_dir.start_run(tmp_path, "pretrain", {"pretrain": {"lr": 1.0}}, resume=True, overwrite=False)
    assert sorted(p.name for p in root.iterdir()) == ["step_000002", "step_000004"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoints",
        "notes.tmp-mine",
        "run_config.json",
    ]
    assert checkpoint.list_checkpoints(root)[-1].name == "step_000004"


def test_replacement_killed_between_renames_is_put_back(tmp_path):
    """replace_dir moves the old version aside, then renames the new one in: a kill between
    the two must not cost the old version."""
    (tmp_path / ".model.old-77").mkdir()
    (tmp_path / ".model.old-77" / "config.json").write_text("{}")
    run_dir.clean_run_dir(tmp_path)
    assert (tmp_path / "model" / "config.json").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/fd")
def test_files_and_folder_reach_the_disk_before_and_after_the_rename(tmp_path, monkeypatch):
    model, opt = _tiny()
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    final = _save(tmp_path, model, opt, 5)
    files = {str(p.relative_to(final)) for p in final.rglob("*") if p.is_file()}
    tmp_names = [Path(s) for s in synced if ".step_000005.tmp-" in s]
    # every file of the checkpoint was flushed under its temporary name, before the rename
    flushed = set()
    for s in tmp_names:
        parts = s.parts[s.parts.index(next(p for p in s.parts if ".tmp-" in p)) + 1 :]
        flushed.add(str(Path(*parts)) if parts else "")
    assert files <= flushed
    # and the folder holding the new name afterwards
    assert synced[-1] == str(tmp_path)


def test_start_run_refuses_another_config_and_overwrite_moves_it_aside(tmp_path, capsys):
    out = tmp_path / "pretrain"
    old = run_dir.run_config(PretrainConfig(lr=2e-4), data_dir=tmp_path)
    run_dir.start_run(out, "pretrain", old, resume=True, overwrite=False)
    (out / "summary.json").write_text("{}")  # made up: the finished run's output

    # a runtime option or a longer run may change; the learning rate may not
    longer = run_dir.run_config(
        PretrainConfig(lr=2e-4, max_steps=5000, log_every=1), data_dir=tmp_path
    )
    run_dir.start_run(out, "pretrain", longer, resume=True, overwrite=False)
    # so may the split of the global batch of 16: over 2 ranks, or 2 micro-batches
    for cfg, dp in (
        (PretrainConfig(lr=2e-4, batch_size=8), 2),
        (PretrainConfig(lr=2e-4, batch_size=8, grad_accum=2), 1),
    ):
        split = run_dir.run_config(cfg, dp_size=dp, data_dir=tmp_path)
        run_dir.start_run(out, "pretrain", split, resume=True, overwrite=False)
    changed = run_dir.run_config(PretrainConfig(lr=8.3e-3, batch_size=4), data_dir=tmp_path)
    with pytest.raises(ConfigError) as e:
        run_dir.start_run(out, "pretrain", changed, resume=True, overwrite=False)
    msg = str(e.value)
    assert "pretrain.lr: 0.0002 -> 0.0083" in msg and "pretrain.global_batch: 16 -> 4" in msg
    assert "--overwrite" in msg and "max_steps" not in msg
    with pytest.raises(ConfigError, match="resume is false"):
        run_dir.start_run(out, "pretrain", longer, resume=False, overwrite=False)
    assert (out / "summary.json").exists()

    run_dir.start_run(out, "pretrain", changed, resume=True, overwrite=True)
    assert (tmp_path / "pretrain.old" / "summary.json").exists()
    assert sorted(p.name for p in out.iterdir()) == ["run_config.json"]
    assert "moved to" in capsys.readouterr().err


def test_a_stage_started_by_lmforge_run_is_no_old_run(tmp_path):
    """`lmforge run` writes stage.json first; overwrite must not move that aside."""
    out = tmp_path / "sft"
    out.mkdir()
    write_json(out / "stage.json", {"hash": "x", "done": False})
    run_dir.start_run(out, "sft", {"sft": {}}, resume=True, overwrite=True)
    assert (out / "stage.json").exists() and not (tmp_path / "sft.old").exists()
