"""`lmforge pretrain` with model.arch t5: span corruption on the micro recipe's shards through
the CLI, its first losses pinned, exact resume, the saved directory opened by transformers'
T5ForConditionalGeneration (with the appended sentinels in its tokenizer), and the refusals."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.config import ConfigError, ModelConfig, model_family
from lmforge.model.load import load
from lmforge.model.t5 import T5
from lmforge.tokenizer import Tokenizer
from lmforge.train import pretrain
from lmforge.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
# the first three training losses of the micro recipe's run (8 steps, batch 4, seq_len 32)
PINNED = [(1, 7.087842), (2, 6.432226), (3, 6.424565)]


def _losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def t5_run(micro_recipe_path, micro_prepared, tmp_path_factory):
    """The CLI on the micro recipe (its micro model made a T5: --model.arch=t5): 8 steps,
    checkpoints at 4 and 8."""
    recipe, run_dir = micro_prepared
    out = tmp_path_factory.mktemp("t5_pretrain")
    cli = [sys.executable, "-m", "lmforge", "pretrain", "--config", str(micro_recipe_path),
           "--data-dir", str(run_dir / "data"), "--tokenizer-dir", str(run_dir / "tokenizer"),
           "--out", str(out), "--model.arch=t5"]  # fmt: skip
    res = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return recipe, run_dir, out / "pretrain"


def test_the_cli_trains_a_t5_with_its_first_losses_pinned(t5_run):
    _, _, out = t5_run
    losses = _losses(out)
    assert [s for s, _ in losses] == list(range(1, 9))
    for (step, got), (_, want) in zip(losses, PINNED):
        assert got == pytest.approx(want, abs=1e-4), step
    assert losses[-1][1] < losses[0][1]
    summary = (out / "summary.json").read_text(encoding="utf-8")
    assert '"objective": "span-corruption"' in summary


def test_saved_t5_opens_in_transformers_with_equal_logits(t5_run):
    transformers = pytest.importorskip("transformers", reason="the reference model")
    _, _, out = t5_run
    theirs = transformers.T5ForConditionalGeneration.from_pretrained(out / "model").eval()
    ours, tok = load(out / "model")
    assert isinstance(ours, T5)
    ids = torch.tensor([tok.encode("the cat sat on the mat")])
    dec = torch.tensor([[ours.cfg.decoder_start_token_id, *ids[0, :3].tolist()]])
    with torch.no_grad():
        ref = theirs(input_ids=ids, decoder_input_ids=dec).logits
        mine = ours(ids, dec)
    torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-4)
    # the micro tokenizer (512 ids) has no sentinels: 100 appended, <extra_id_0> the last id
    assert theirs.config.vocab_size == 612
    assert Tokenizer.load(out / "model").token_id("<extra_id_0>") == 611
    hf_tok = transformers.AutoTokenizer.from_pretrained(out / "model")
    assert hf_tok.convert_tokens_to_ids("<extra_id_99>") == 512


def test_resume_reproduces_the_uninterrupted_t5_run(t5_run, tmp_path):
    recipe, run_dir, out = t5_run
    # a run that stopped after step 4: only its step-4 checkpoint and its metrics up to 4 exist
    shutil.copytree(out / "checkpoints" / "step_000004", tmp_path / "checkpoints" / "step_000004")
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in read_metrics(out / "metrics.jsonl") if r["step"] <= 4)
    )
    cfg = dataclasses.replace(recipe.pretrain, resume=True)
    t5 = dataclasses.replace(recipe.model, arch="t5")
    pretrain.run(cfg, t5, run_dir / "data", run_dir / "tokenizer", tmp_path)
    assert _losses(tmp_path) == _losses(out)  # bit-for-bit equal floats, steps 1..8
    val = lambda d: [r for r in read_metrics(d / "metrics.jsonl") if "val_en_loss" in r]  # noqa: E731
    assert val(tmp_path) == val(out) and val(out)


def test_t5_config_and_unsupported_options_are_refused_by_name(micro_prepared, tmp_path):
    recipe, run_dir = micro_prepared
    assert model_family(ModelConfig(arch="t5", dim=32, n_layer=2, n_head=2)) == "seq2seq"
    with pytest.raises(ConfigError, match="sliding_window"):
        ModelConfig(arch="t5", dim=32, n_layer=2, n_head=2, sliding_window=8)
    t5 = ModelConfig(arch="t5", dim=32, n_layer=2, n_head=2, max_seq_len=64)
    args = (run_dir / "data", run_dir / "tokenizer", tmp_path)
    with pytest.raises(ConfigError, match="pretrain.grad_accum"):
        pretrain.run(dataclasses.replace(recipe.pretrain, grad_accum=2), t5, *args)
    with pytest.raises(ConfigError, match="model.vocab_size .* too small for T5"):
        pretrain.run(recipe.pretrain, dataclasses.replace(t5, vocab_size=512), *args)


def test_cli_errors_name_the_problem_without_a_traceback(
    micro_recipe_path, micro_prepared, tmp_path
):
    _, run_dir = micro_prepared
    cli = [sys.executable, "-m", "lmforge", "pretrain", "--config", str(micro_recipe_path),
           "--data-dir", str(run_dir / "data"), "--tokenizer-dir", str(run_dir / "tokenizer"),
           "--out", str(tmp_path), "--model.arch=t5"]  # fmt: skip
    for extra, message in (
        (["--model.sliding_window=8"], "is an encoder-decoder (T5): sliding_window do not apply"),
        (["--pretrain.grad_accum=2"], "pretrain.grad_accum: not supported for model.arch t5"),
    ):
        res = subprocess.run([*cli, *extra], capture_output=True, text=True, timeout=120)
        assert res.returncode != 0 and message in res.stderr, res.stderr[-1000:]
        assert "Traceback" not in res.stderr


def test_lmforge_run_refuses_a_t5_before_any_stage(micro_recipe_path, tmp_path):
    from lmforge import pipeline
    from lmforge.config import load_recipe

    recipe = load_recipe(micro_recipe_path)
    recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, arch="t5"))
    with pytest.raises(ConfigError, match="is an encoder-decoder: `lmforge run` chains decoder"):
        pipeline.run(recipe, tmp_path / "run")
    assert not (tmp_path / "run").exists()
