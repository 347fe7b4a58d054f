"""Pipeline parallelism (dist.pp) under torchrun with 2 CPU processes (gloo): GPipe and 1F1B give
one process's losses and weights after two steps on the same global batch, with the global
gradient clip acting, and their checkpoints resume in one process."""

import json
import shutil

import pytest
import torch

from lmforge.config import ConfigError, DistConfig
from lmforge.train.dist import DistInfo, data_parallel_only, ddp_only
from lmforge.train.pipeline import bubble, owner, split_layers
from tests.train.test_dist import ATOL, losses, pretrain, weights

CLIP = ["--grad_clip", "0.2"]  # the gradient norm is ~0.5-0.9: clipping acts on every step


def val_losses(out) -> list[float]:
    """The held-out losses logged at each evaluation (all languages, in order)."""
    rows = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").open()]
    return [v for r in rows for k, v in sorted(r.items()) if k.startswith("val_") and "loss" in k]


def test_split_layers_and_owners():
    assert split_layers(5, 2) == [range(0, 3), range(3, 5)]
    parts = split_layers(4, 2)
    assert owner("tok_emb.weight", parts) == 0
    assert owner("layers.2.attn.wqkv.weight", parts) == 1
    assert owner("lm_head.weight", parts) == owner("norm.weight", parts) == 1
    assert bubble(2, 4) == pytest.approx(1 / 5)


def test_bad_pipeline_options_are_named():
    with pytest.raises(ConfigError, match="dist.pp_schedule"):
        DistConfig(pp=2, pp_schedule="zb")
    with pytest.raises(ConfigError, match="not fsdp"):
        DistConfig(pp=2, strategy="fsdp")
    with pytest.raises(ConfigError, match="dist.pp_microbatches"):
        DistConfig(pp=4, pp_schedule="1f1b", pp_microbatches=2)
    with pytest.raises(ConfigError, match="model.n_layer"):
        split_layers(2, 4)
    info = DistInfo(rank=0, world_size=2, strategy="none", pp=2)
    with pytest.raises(ConfigError, match="dist.pp 1"):
        data_parallel_only(info, "sft", lora=False)
    with pytest.raises(ConfigError, match="dist.pp 1"):
        ddp_only(info, "reward")


def assert_same_run(got, ref) -> None:
    """The losses and final weights of run `got` equal those of run `ref` (float32 rounding)."""
    assert losses(got) == pytest.approx(losses(ref), rel=1e-5)
    for k, w in weights(ref).items():
        torch.testing.assert_close(weights(got)[k], w, rtol=1e-5, atol=ATOL, msg=k)


@pytest.fixture(scope="module")
def single(micro_recipe_path, micro_prepared, tmp_path_factory):
    """One process, batch 8: 2 steps, saving at step 2."""
    _, run_dir = micro_prepared
    out = tmp_path_factory.mktemp("single_pp")
    r = pretrain(
        micro_recipe_path, run_dir, out, 1,
        "--batch_size", "8", "--max_steps", "2", "--save_every", "2", *CLIP,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipeline_step_equals_one_process(
    schedule, single, micro_recipe_path, micro_prepared, tmp_path
):
    """2 stages (embedding + block 0 | block 1 + norm + tied head), 4 micro-batches of 2."""
    _, run_dir = micro_prepared
    opts = ["--dist.pp", "2", "--dist.pp_schedule", schedule, "--dist.pp_microbatches", "4"]
    r = pretrain(
        micro_recipe_path, run_dir, tmp_path, 2,
        "--batch_size", "8", "--max_steps", "2", "--save_every", "2", *CLIP, dist=opts,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(tmp_path) == pytest.approx(losses(single), rel=1e-5)
    summary = json.loads((tmp_path / "pretrain" / "summary.json").read_text())
    assert (summary["world_size"], summary["pp"]) == (2, 2)
    w1, w2 = weights(single), weights(tmp_path)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=ATOL, msg=k)


@pytest.fixture(scope="module")
def whole4(micro_recipe_path, micro_prepared, tmp_path_factory):
    """One process, batch 8, 4 steps without a break."""
    _, run_dir = micro_prepared
    out = tmp_path_factory.mktemp("whole4_pp")
    r = pretrain(
        micro_recipe_path, run_dir, out, 1,
        "--batch_size", "8", "--max_steps", "4", "--save_every", "2", "--eval_every", "2", *CLIP,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.slow
def test_pipeline_checkpoint_resumes_in_one_process(
    whole4, micro_recipe_path, micro_prepared, tmp_path
):
    """2 steps as a 1F1B pipeline, saved; steps 3-4 in one process = 4 steps in one process."""
    _, run_dir = micro_prepared
    opts = ["--dist.pp", "2", "--dist.pp_schedule", "1f1b", "--dist.pp_microbatches", "2"]
    first = pretrain(
        micro_recipe_path, run_dir, tmp_path, 2,
        "--batch_size", "8", "--max_steps", "2", "--save_every", "2", "--eval_every", "2", *CLIP,
        dist=opts,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    # the evaluation at step 2 runs on rank 0's whole model, synced from both stages
    assert val_losses(tmp_path) == pytest.approx(val_losses(whole4)[: len(val_losses(tmp_path))])
    assert val_losses(tmp_path)
    rest = pretrain(
        micro_recipe_path, run_dir, tmp_path, 1,
        "--batch_size", "8", "--max_steps", "4", "--save_every", "2", *CLIP,
    )  # fmt: skip
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert "resuming from" in rest.stderr
    assert_same_run(tmp_path, whole4)


@pytest.mark.slow
def test_one_process_checkpoint_resumes_as_a_pipeline(
    single, whole4, micro_recipe_path, micro_prepared, tmp_path
):
    """One process's step-2 checkpoint, continued by a GPipe pipeline to step 4."""
    _, run_dir = micro_prepared
    shutil.copytree(single, tmp_path, dirs_exist_ok=True)
    opts = ["--dist.pp", "2", "--dist.pp_schedule", "gpipe", "--dist.pp_microbatches", "4"]
    rest = pretrain(
        micro_recipe_path, run_dir, tmp_path, 2,
        "--batch_size", "8", "--max_steps", "4", "--save_every", "2", *CLIP, dist=opts,
    )  # fmt: skip
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert "resuming from" in rest.stderr
    assert_same_run(tmp_path, whole4)


@pytest.mark.slow
def test_pipeline_with_ddp_equals_one_process(single, micro_recipe_path, micro_prepared, tmp_path):
    """4 processes: 2 pipelines of 2 stages, each reading half of the global batch of 8."""
    _, run_dir = micro_prepared
    opts = ["--dist.strategy", "ddp", "--dist.pp", "2", "--dist.pp_microbatches", "2"]
    r = pretrain(
        micro_recipe_path, run_dir, tmp_path, 4,
        "--batch_size", "4", "--max_steps", "2", "--save_every", "2", *CLIP, dist=opts,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(tmp_path) == pytest.approx(losses(single), rel=1e-5)
    summary = json.loads((tmp_path / "pretrain" / "summary.json").read_text())
    assert (summary["world_size"], summary["pp"], summary["tokens_per_step"]) == (4, 2, 8 * 32)
    for k, w in weights(single).items():
        torch.testing.assert_close(weights(tmp_path)[k], w, rtol=1e-5, atol=ATOL, msg=k)


@pytest.mark.slow
def test_pipeline_gradient_accumulation_matches(
    single, micro_recipe_path, micro_prepared, tmp_path
):
    """2 accumulated batches of 4, each 2 micro-batches of 2 = one process with a batch of 8."""
    _, run_dir = micro_prepared
    opts = ["--dist.pp", "2", "--dist.pp_microbatches", "2"]
    r = pretrain(
        micro_recipe_path, run_dir, tmp_path, 2,
        "--batch_size", "4", "--grad_accum", "2", "--max_steps", "2", *CLIP, dist=opts,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(tmp_path, single)


@pytest.mark.slow
def test_three_stages_untied_equal_one_process(micro_recipe_path, micro_prepared, tmp_path):
    """3 stages (a middle stage that neither embeds nor predicts), untied embeddings, 3 blocks."""
    _, run_dir = micro_prepared
    model = ["--model.n_layer", "3", "--model.tie_embeddings", "false", *CLIP]
    one = pretrain(
        micro_recipe_path, run_dir, tmp_path / "one", 1,
        "--batch_size", "6", "--max_steps", "2", *model,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    opts = ["--dist.pp", "3", "--dist.pp_schedule", "1f1b", "--dist.pp_microbatches", "3"]
    three = pretrain(
        micro_recipe_path, run_dir, tmp_path / "pp", 3,
        "--batch_size", "6", "--max_steps", "2", *model, dist=opts,
    )  # fmt: skip
    assert three.returncode == 0, three.stderr[-3000:]
    assert losses(tmp_path / "pp") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    w1, w3 = weights(tmp_path / "one"), weights(tmp_path / "pp")
    assert w1.keys() == w3.keys() and "lm_head.weight" in w1
    for k in w1:
        torch.testing.assert_close(w3[k], w1[k], rtol=1e-5, atol=ATOL, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["pipeline->fsdp", "fsdp->pipeline"])
def test_checkpoints_move_between_pipeline_and_fsdp(
    direction, whole4, micro_recipe_path, micro_prepared, tmp_path
):
    """A pipeline's plain checkpoint resumes sharded under FSDP2 (2 ranks, batch 4 each), and an
    FSDP2 sharded (DCP) checkpoint resumes as a 1F1B pipeline: 4 steps as if uninterrupted."""
    _, run_dir = micro_prepared
    pp = (["--batch_size", "8"], ["--dist.pp", "2", "--dist.pp_microbatches", "2"])
    fsdp = (["--batch_size", "4"], ["--dist.strategy", "fsdp"])
    first, second = (pp, fsdp) if direction == "pipeline->fsdp" else (fsdp, pp)
    for (batch, opts), steps in ((first, "2"), (second, "4")):
        r = pretrain(
            micro_recipe_path, run_dir, tmp_path, 2,
            *batch, "--max_steps", steps, "--save_every", "2", *CLIP, dist=opts,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr
    assert_same_run(tmp_path, whole4)


@pytest.mark.slow
def test_microbatches_that_do_not_divide_the_batch_are_named(
    micro_recipe_path, micro_prepared, tmp_path
):
    _, run_dir = micro_prepared
    opts = ["--dist.pp", "2", "--dist.pp_microbatches", "4"]
    r = pretrain(
        micro_recipe_path, run_dir, tmp_path, 2, "--batch_size", "6", "--max_steps", "1",
        dist=opts,
    )  # fmt: skip
    assert r.returncode != 0
    assert "dist.pp_microbatches (4) must divide the batch size per rank (6)" in r.stderr
    assert "lmforge: error on rank" in r.stderr  # the named error, not a traceback
