"""torchrun with 2 (and 4) CPU processes (gloo): DDP, FSDP2, tensor parallel and 2-D parallel
training give the same steps as one process on the same global batch, checkpoints move between
strategies and process counts, and a failing rank stops every rank."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
# Gradients are summed in a different order across ranks (float32 rounding, ~1e-7 relative); AdamW
# divides by sqrt(v), so for a near-zero gradient that rounding moves a weight by up to ~1e-6 after
# two steps at lr 3e-3. Measured: at most 2.2e-6, in 2 of 16,384 elements.
ATOL = 1e-5


# grouped-query attention with biases: tensor parallelism must split q, k and v heads alike
GQA = ["--model.n_head", "4", "--model.n_kv_head", "2", "--model.arch", "qwen2"]
GQA += ["--model.qkv_bias", "true"]
GQA += ["--grad_clip", "0.2"]  # the gradient norm is ~0.5-0.9: clipping acts on every step
STRATEGIES = {  # name: (processes, batch per rank for a global batch of 8, options)
    "ddp": (2, 4, ["--dist.strategy", "ddp"]),
    "fsdp": (2, 4, ["--dist.strategy", "fsdp"]),
    "tp": (2, 8, ["--dist.tp", "2"]),
    "fsdp+tp": (4, 4, ["--dist.strategy", "fsdp", "--dist.tp", "2"]),
}


def pretrain(recipe_path, run_dir, out, nproc: int, *args, dist=None, env=None, timeout=240):
    """`lmforge pretrain` in one process, or under torchrun with nproc processes (with the
    options `dist`, DDP when not given)."""
    cli = ["-m", "lmforge", "pretrain", "--config", str(recipe_path), "--device", "cpu"]
    cli += ["--data-dir", str(run_dir / "data"), "--tokenizer-dir", str(run_dir / "tokenizer")]
    cli += ["--out", str(out), "--eval_every", "0", "--log_every", "1", *args]
    if nproc > 1:
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        cli = launcher + cli + (dist or ["--dist.strategy", "ddp"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, *cli], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
    )


def losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").open()]
    return [r["loss"] for r in rows if "loss" in r]


def weights(out: Path) -> dict[str, torch.Tensor]:
    """The final model's tensors (HF names)."""
    return load_file(out / "pretrain" / "model" / "model.safetensors")


def test_ddp_step_equals_one_process_on_the_same_global_batch(
    micro_recipe_path, micro_prepared, tmp_path
):
    _, run_dir = micro_prepared
    one = pretrain(
        micro_recipe_path, run_dir, tmp_path / "one", 1, "--batch_size", "8", "--max_steps", "2"
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = pretrain(
        micro_recipe_path, run_dir, tmp_path / "two", 2, "--batch_size", "4", "--max_steps", "2"
    )
    assert two.returncode == 0, two.stderr[-3000:]
    # the same samples, summed in a different order: float32 rounding only
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=ATOL, msg=k)
    summary = json.loads((tmp_path / "two" / "pretrain" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["tokens_per_step"] == 8 * 32


def test_ddp_gradient_accumulation_matches(micro_recipe_path, micro_prepared, tmp_path):
    """2 ranks x 2 micro-batches of 2 = one process with a batch of 8."""
    _, run_dir = micro_prepared
    one = pretrain(
        micro_recipe_path, run_dir, tmp_path / "one", 1, "--batch_size", "8", "--max_steps", "2"
    )
    two = pretrain(
        micro_recipe_path, run_dir, tmp_path / "two", 2,
        "--batch_size", "2", "--grad_accum", "2", "--max_steps", "2",
    )  # fmt: skip
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    for k, w in weights(tmp_path / "one").items():
        torch.testing.assert_close(weights(tmp_path / "two")[k], w, rtol=1e-5, atol=ATOL)


def test_save_with_two_processes_resume_with_one(micro_recipe_path, micro_prepared, tmp_path):
    _, run_dir = micro_prepared
    whole = pretrain(
        micro_recipe_path, run_dir, tmp_path / "whole", 1, "--batch_size", "8", "--max_steps", "4"
    )
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = pretrain(
        micro_recipe_path, run_dir, tmp_path / "split", 2,
        "--batch_size", "4", "--max_steps", "2", "--save_every", "2",
    )  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    rest = pretrain(
        micro_recipe_path, run_dir, tmp_path / "split", 1,
        "--batch_size", "8", "--max_steps", "4", "--save_every", "2",
    )  # fmt: skip
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert losses(tmp_path / "split") == pytest.approx(losses(tmp_path / "whole"), rel=1e-5)


@pytest.fixture(scope="module")
def single_gqa(micro_recipe_path, micro_prepared, tmp_path_factory):
    """One process, global batch 8, the GQA model: 2 steps, and 4 steps with a save at 2."""
    _, run_dir = micro_prepared
    out = tmp_path_factory.mktemp("single_gqa")
    for steps in (2, 4):
        r = pretrain(
            micro_recipe_path, run_dir, out / str(steps), 1,
            "--batch_size", "8", "--max_steps", str(steps), "--save_every", "2", *GQA,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.parametrize("name", ["fsdp", "tp", "fsdp+tp"])
def test_sharded_step_equals_one_process(
    name, single_gqa, micro_recipe_path, micro_prepared, tmp_path
):
    """FSDP2 on 2 ranks, tensor parallel on 2, and both (2-D: 2 x 2 ranks): two optimizer
    steps on the same global batch give the single process's losses and weights."""
    _, run_dir = micro_prepared
    nproc, batch, opts = STRATEGIES[name]
    r = pretrain(
        micro_recipe_path, run_dir, tmp_path, nproc,
        "--batch_size", str(batch), "--max_steps", "2", *GQA, dist=opts,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(tmp_path) == pytest.approx(losses(single_gqa / "2"), rel=1e-5)
    w1, w2 = weights(single_gqa / "2"), weights(tmp_path)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=ATOL, msg=k)
    summary = json.loads((tmp_path / "pretrain" / "summary.json").read_text())
    assert summary["world_size"] == nproc and summary["tokens_per_step"] == 8 * 32


@pytest.mark.parametrize(
    "first,second",
    [("fsdp", None), (None, "fsdp"), ("tp", None), (None, "tp"), ("tp", "fsdp+tp")],
    ids=lambda s: s or "one",
)
def test_resume_with_another_strategy_and_process_count(
    first, second, single_gqa, micro_recipe_path, micro_prepared, tmp_path
):
    """Save at step 2 with one layout, resume to step 4 with another (DCP reshards, the fused
    projections' rows are reordered between tp degrees): the losses and weights of an
    uninterrupted single process. The last sharded checkpoint exports to the same model."""
    _, run_dir = micro_prepared
    for steps, name in ((2, first), (4, second)):
        nproc, batch, opts = STRATEGIES[name] if name else (1, 8, None)
        r = pretrain(
            micro_recipe_path, run_dir, tmp_path / "run", nproc, "--batch_size", str(batch),
            "--max_steps", str(steps), "--save_every", "2", *GQA, dist=opts,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr
    assert losses(tmp_path / "run") == pytest.approx(losses(single_gqa / "4"), rel=1e-5)
    final = weights(tmp_path / "run")
    for k, w in weights(single_gqa / "4").items():
        torch.testing.assert_close(final[k], w, rtol=1e-5, atol=ATOL, msg=k)
    last = tmp_path / "run" / "pretrain" / "checkpoints" / "step_000004"
    assert (last / "dcp").is_dir() == (second is not None)
    if second is not None:
        cmd = [sys.executable, "-m", "lmforge", "export", str(last), str(tmp_path / "exported")]
        e = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert e.returncode == 0, e.stderr[-3000:]
        exported = load_file(tmp_path / "exported" / "model.safetensors")
        assert exported.keys() == final.keys()
        assert all(torch.equal(exported[k], final[k]) for k in final)
        again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert again.returncode != 0 and "already exists" in again.stderr


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_failing_rank_stops_every_rank(strategy, micro_recipe_path, micro_prepared, tmp_path):
    _, run_dir = micro_prepared
    r = pretrain(
        micro_recipe_path, run_dir, tmp_path / "fail", 2, "--batch_size", "2", "--max_steps", "6",
        dist=["--dist.strategy", strategy], env={"LMFORGE_FAIL_AT": "1:3"}, timeout=120,
    )  # fmt: skip
    assert r.returncode != 0
    assert "rank 1: failing at step 3 (LMFORGE_FAIL_AT)" in r.stdout + r.stderr
    assert not (tmp_path / "fail" / "pretrain" / "model").exists()


def test_strategy_none_under_torchrun_is_refused(micro_recipe_path, micro_prepared, tmp_path):
    _, run_dir = micro_prepared
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = [
        sys.executable,
        *launcher,
        "-m",
        "lmforge",
        "pretrain",
        "--config",
        str(micro_recipe_path),
    ]
    cmd += ["--out", str(tmp_path), "--data-dir", str(run_dir / "data")]
    cmd += ["--tokenizer-dir", str(run_dir / "tokenizer"), "--max_steps", "1"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "pass --dist.strategy ddp or fsdp" in r.stdout + r.stderr


def finetune(stage, recipe_path, model_dir, out, nproc: int, *args, dist=None, timeout=240):
    """`lmforge STAGE` (sft, reward, dpo, distill, prune) in one process, or under torchrun with
    nproc processes."""
    cli = ["-m", "lmforge", stage, "--config", str(recipe_path), "--device", "cpu"]
    cli += ["--model-dir", str(model_dir), "--out", str(out), "--log_every", "1", *args]
    if nproc > 1:
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        cli = launcher + cli + dist
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *cli], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.parametrize(
    "stage,strategy",
    [("sft", "ddp"), ("sft", "fsdp"), ("dpo", "ddp"), ("dpo", "fsdp")],
    ids=["sft-ddp", "sft-fsdp", "dpo-ddp", "dpo-fsdp"],
)
def test_finetuning_on_two_ranks_equals_one_process(
    stage, strategy, micro_recipe_path, micro_pretrained, tmp_path
):
    """SFT and DPO with DDP or FSDP2: 2 ranks with 2 examples each take the same two steps
    as one process with 4 (the loss is normalised over the global batch, not per rank)."""
    _, model_dir = micro_pretrained
    steps = ["--max_steps", "2", "--eval_every", "0", "--save_every", "0"]
    one = finetune(
        stage, micro_recipe_path, model_dir, tmp_path / "one", 1, "--batch_size", "4", *steps
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = finetune(
        stage, micro_recipe_path, model_dir, tmp_path / "two", 2, "--batch_size", "2", *steps,
        dist=["--dist.strategy", strategy],
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]

    def run_losses(out):
        rows = [json.loads(line) for line in (out / stage / "metrics.jsonl").open()]
        return [r["loss"] for r in rows if "loss" in r]

    assert len(run_losses(tmp_path / "one")) == 2
    assert run_losses(tmp_path / "two") == pytest.approx(run_losses(tmp_path / "one"), rel=1e-5)
    w1 = load_file(tmp_path / "one" / stage / "model" / "model.safetensors")
    w2 = load_file(tmp_path / "two" / stage / "model" / "model.safetensors")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=ATOL, msg=k)


OUTPUTS = {"reward": "reward", "distill": "distill", "prune": "prune/magnitude"}


@pytest.mark.parametrize("stage", list(OUTPUTS))
def test_data_parallel_stages_on_two_ranks_equal_one_process(
    stage, micro_recipe_path, micro_prepared, micro_pretrained, tmp_path
):
    """The reward model, distillation and pruning's recovery under torchrun with DDP: 2 ranks
    with 2 rows each take the same two steps as one process with 4."""
    _, run_dir = micro_prepared
    _, model_dir = micro_pretrained
    args = ["--max_steps", "2", "--eval_every", "0", "--save_every", "0"]
    if stage != "reward":
        args += ["--data-dir", str(run_dir / "data"), "--seq_len", "32", "--warmup_steps", "1"]
    if stage == "distill":
        args += ["--dim", "16", "--baseline", "false"]
    one = finetune(
        stage, micro_recipe_path, model_dir, tmp_path / "one", 1, "--batch_size", "4", *args
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = finetune(
        stage, micro_recipe_path, model_dir, tmp_path / "two", 2, "--batch_size", "2", *args,
        dist=["--dist.strategy", "ddp"],
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]

    def run_losses(out):
        rows = [json.loads(line) for line in (out / OUTPUTS[stage] / "metrics.jsonl").open()]
        return [r["loss"] for r in rows if "loss" in r]

    assert len(run_losses(tmp_path / "one")) == 2
    assert run_losses(tmp_path / "two") == pytest.approx(run_losses(tmp_path / "one"), rel=1e-5)
    w1 = load_file(tmp_path / "one" / OUTPUTS[stage] / "model" / "model.safetensors")
    w2 = load_file(tmp_path / "two" / OUTPUTS[stage] / "model" / "model.safetensors")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=ATOL, msg=k)
    if stage == "prune":  # the ranks prune alike: the zeros are where one process put them
        assert all(torch.equal(w1[k] == 0, w2[k] == 0) for k in w1)


def test_finetuning_refuses_layouts_it_cannot_run(micro_recipe_path, micro_pretrained, tmp_path):
    _, model_dir = micro_pretrained
    r = finetune(
        "sft", micro_recipe_path, model_dir, tmp_path, 2, "--lora.r", "4", "--max_steps", "1",
        dist=["--dist.strategy", "fsdp"], timeout=120,
    )  # fmt: skip
    assert r.returncode != 0
    assert "sft with LoRA trains a small adapter over a frozen base: use dist.strategy ddp" in (
        r.stdout + r.stderr
    )
    assert not (tmp_path / "sft" / "checkpoints").exists()
