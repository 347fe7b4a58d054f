"""The pretraining driver: exact resume, metrics, checkpoints, evaluation, a learning model."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import transformers
from safetensors.torch import load_file

from lmforge.train import pretrain
from lmforge.train.checkpoint import list_checkpoints
from lmforge.train.metrics import read_metrics


def _losses(out_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(out_dir / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def full_run(micro_prepared, tmp_path_factory):
    recipe, run_dir = micro_prepared
    out = tmp_path_factory.mktemp("pretrain_full")
    summary = pretrain.run(
        recipe.pretrain, recipe.model, run_dir / "data", run_dir / "tokenizer", out
    )
    return recipe, run_dir, out, summary


def test_run_writes_everything(full_run):
    recipe, run_dir, out, summary = full_run
    assert summary["step"] == 8 and not summary["interrupted"]
    assert (out / "loss.png").stat().st_size > 1000
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_000004", "step_000008"]
    assert set(summary["val"]) == {"en", "zh"}
    for r in summary["val"].values():
        assert 0 < r["bpb"] < 20 and r["loss"] > 0
    losses = _losses(out)
    assert [s for s, _ in losses] == list(range(1, 9))
    assert losses[-1][1] < losses[0][1]  # it learns something in 8 steps
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["vocab_size"] == 512


def test_resume_reproduces_the_uninterrupted_losses(full_run, tmp_path):
    recipe, run_dir, out, _ = full_run
    # a run that stopped after step 4: only its step-4 checkpoint and its metrics up to 4 exist
    shutil.copytree(out / "checkpoints" / "step_000004", tmp_path / "checkpoints" / "step_000004")
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in read_metrics(out / "metrics.jsonl") if r["step"] <= 4)
    )
    pretrain.run(recipe.pretrain, recipe.model, run_dir / "data", run_dir / "tokenizer", tmp_path)
    assert _losses(tmp_path) == _losses(out)  # bit-for-bit equal floats, steps 1..8


def test_checkpoint_opens_in_transformers_with_same_loss(full_run):
    import torch

    from lmforge.model.checkpoint import load_model

    _, run_dir, out, _ = full_run
    ours = load_model(out / "model")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out / "model").eval()
    x = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        assert (ours(x) - theirs(x).logits).abs().max().item() <= 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(out / "model")
    assert tok.bos_token == "<|bos|>" and tok.eos_token == "<|eos|>"


def test_seq_len_over_context_is_an_error(micro_prepared, tmp_path):
    from lmforge.config import ConfigError

    recipe, run_dir = micro_prepared
    cfg = dataclasses.replace(recipe.pretrain, seq_len=128)
    with pytest.raises(ConfigError, match=r"seq_len \(128\) exceeds model.max_seq_len \(64\)"):
        pretrain.run(cfg, recipe.model, run_dir / "data", run_dir / "tokenizer", tmp_path)


def test_resume_clears_what_a_kill_left_and_takes_the_last_whole_checkpoint(full_run, tmp_path):
    recipe, run_dir, out, _ = full_run
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(out / "checkpoints" / "step_000004", ckpts / "step_000004")
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in read_metrics(out / "metrics.jsonl") if r["step"] <= 4)
    )
    # made up for the test: a checkpoint killed while being written, one killed while being
    # deleted (its weights gone, its state.json still there), a final model half written
    (ckpts / ".step_000005.tmp-k1ll3d").mkdir()
    (ckpts / ".step_000005.tmp-k1ll3d" / "model.safetensors").write_bytes(b"partial")
    half = shutil.copytree(ckpts / "step_000004", ckpts / "step_000006")
    (half / "model.safetensors").unlink()
    (tmp_path / ".model.tmp-abc123").mkdir()

    pretrain.run(recipe.pretrain, recipe.model, run_dir / "data", run_dir / "tokenizer", tmp_path)
    assert _losses(tmp_path) == _losses(out)  # resumed from step 4, the last whole checkpoint
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000004", "step_000008"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def uneven_run(micro_prepared, tmp_path_factory):
    """Checkpoints that fall between metrics lines (save_every 3, log_every 2), as in the tiny
    recipe."""
    recipe, run_dir = micro_prepared
    cfg = dataclasses.replace(recipe.pretrain, save_every=3, log_every=2, eval_every=0)
    out = tmp_path_factory.mktemp("pretrain_uneven")
    pretrain.run(cfg, recipe.model, run_dir / "data", run_dir / "tokenizer", out)
    return cfg, out


def test_resume_between_metrics_lines_logs_the_uninterrupted_losses(
    micro_prepared, uneven_run, tmp_path
):
    recipe, run_dir = micro_prepared
    cfg, out = uneven_run
    # a run that stopped after its step-3 checkpoint: the sum of step 3's loss is in there
    shutil.copytree(out / "checkpoints" / "step_000003", tmp_path / "checkpoints" / "step_000003")
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in read_metrics(out / "metrics.jsonl") if r["step"] <= 3)
    )
    pretrain.run(cfg, recipe.model, run_dir / "data", run_dir / "tokenizer", tmp_path)
    assert [s for s, _ in _losses(out)] == [2, 4, 6, 8]
    assert _losses(tmp_path) == _losses(out)


def test_rerun_of_a_finished_run_logs_nothing_twice(micro_prepared, uneven_run, tmp_path):
    recipe, run_dir = micro_prepared
    cfg, out = uneven_run
    shutil.copytree(out, tmp_path / "run")
    summary = pretrain.run(
        cfg, recipe.model, run_dir / "data", run_dir / "tokenizer", tmp_path / "run"
    )
    assert read_metrics(tmp_path / "run" / "metrics.jsonl") == read_metrics(out / "metrics.jsonl")
    assert summary["step"] == 8 and set(summary["val"]) == {"en", "zh"}


def _pretrain_cli(recipe_path, run_dir, out, *args) -> list[str]:
    cli = [sys.executable, "-m", "lmforge", "pretrain", "--config", str(recipe_path)]
    cli += ["--device", "cpu", "--data-dir", str(run_dir / "data")]
    cli += ["--tokenizer-dir", str(run_dir / "tokenizer"), "--out", str(out), *args]
    return cli


@pytest.mark.slow
def test_kill_9_at_checkpoints_then_resume_equals_the_uninterrupted_run(
    micro_recipe_path, micro_prepared, tmp_path
):
    """The crash probe: `lmforge pretrain` is killed with SIGKILL whenever a checkpoint is being
    written or deleted (or, failing that, right after a new one appears), then rerun; after the
    last rerun its weights and logged losses are bit-identical to an uninterrupted run's and
    nothing a kill left is in view. Where exactly each kill lands is up to the scheduler; the
    outcome may not depend on it."""
    _, run_dir = micro_prepared
    args = ["--max_steps", "12", "--save_every", "1", "--keep_last", "2", "--eval_every", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(out):
        cmd = _pretrain_cli(micro_recipe_path, run_dir, out, *args)
        return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)

    ref = run(tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-2000:]

    out, kills, where = tmp_path / "killed", 0, []
    ckpts = out / "pretrain" / "checkpoints"
    for attempt in range(4):  # bounded: four kills at most, then a run to the end
        cmd = _pretrain_cli(micro_recipe_path, run_dir, out, *args)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        before = set(os.listdir(ckpts)) if ckpts.is_dir() else set()
        seen: set[str] = set()  # checkpoint names this run made: being written, deleted, done
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            names = set(os.listdir(ckpts)) if ckpts.is_dir() else set()
            seen |= names - before  # what a killed run left is cleared once this one starts
            if len(seen) > 2 * attempt:  # each run gets further before its kill
                proc.send_signal(signal.SIGKILL)
                kills, where = kills + 1, where + [sorted(names)]
                break
            time.sleep(0.002)
        proc.wait(30)
        proc.stderr.close()
        if proc.returncode == 0:  # it finished before a kill could land
            break
    assert kills >= 1
    print(f"{kills} kills, checkpoints folder at each: {where}")  # with -s
    last = run(out)
    assert last.returncode == 0, last.stderr[-2000:]

    got = load_file(out / "pretrain" / "model" / "model.safetensors")
    want = load_file(tmp_path / "ref" / "pretrain" / "model" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert _losses(out / "pretrain") == _losses(tmp_path / "ref" / "pretrain")
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_000011", "step_000012"]
    left = [p.name for p in ckpts.iterdir()] + [p.name for p in (out / "pretrain").iterdir()]
    assert not [n for n in left if n.startswith(".")], left
