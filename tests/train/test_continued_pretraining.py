"""Continued pretraining (`pretrain.init_from`, replay): the weights really are the given
model's, the schedule warms up again, replay rows come from the replay data, data of another
tokenizer is refused, and the result opens as a model with the original's tokenizer."""

import dataclasses
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ConfigError, DataConfig, ModelConfig
from lmforge.data import prepare
from lmforge.data.loader import PackedLoader, replay_rows
from lmforge.data.readers import DataError
from lmforge.model.checkpoint import load_model, save_model
from lmforge.model.load import load
from lmforge.model.transformer import GPT
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer_train import train_tokenizer
from lmforge.train import pretrain
from lmforge.train.metrics import read_metrics
from lmforge.train.optim import lr_at

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def base_dir(micro_prepared, tmp_path_factory):
    """A model directory to continue from: random weights (made up for the test, seeded), a
    shape unlike the micro recipe's model section (dim 48, 3 layers, 3 heads against 32, 2, 2),
    and the micro tokenizer."""
    _, run_dir = micro_prepared
    tok = Tokenizer.load(run_dir / "tokenizer")
    cfg = ModelConfig(
        vocab_size=tok.vocab_size, dim=48, n_layer=3, n_head=3, max_seq_len=64,
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
    )  # fmt: skip
    torch.manual_seed(7)
    d = tmp_path_factory.mktemp("base_model")
    save_model(GPT(cfg), d, tokenizer_dir=run_dir / "tokenizer", pad_token_id=tok.pad_id)
    return d


@pytest.fixture(scope="module")
def replay_dir(micro_prepared, tmp_path_factory):
    """General text for replay (Shakespeare, a few scenes) in the micro tokenizer's ids."""
    recipe, run_dir = micro_prepared
    src = {
        "name": "shakespeare", "path": str(REPO / "datasets/tinyshakespeare/input.txt.gz"),
        "split_on": "blank_line", "min_chars": 400, "max_docs": 60, "lang": "en",
    }  # fmt: skip
    data = DataConfig(sources=[src], val_fraction=0.1, num_workers=1)
    out = tmp_path_factory.mktemp("replay_data")
    prepare.run(data, run_dir / "tokenizer", recipe.base_dir, out)
    return out


def _cfg(recipe, base_dir, **kw):
    kw = {"max_steps": 2, "eval_every": 0, "save_every": 0, "log_every": 1, **kw}
    return dataclasses.replace(recipe.pretrain, init_from=str(base_dir), **kw)


def _loss(model, x, y) -> float:
    with torch.no_grad():
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()


@pytest.fixture(scope="module")
def continued(micro_prepared, base_dir, tmp_path_factory):
    recipe, run_dir = micro_prepared
    out = tmp_path_factory.mktemp("continued")
    cfg = _cfg(recipe, base_dir)
    summary = pretrain.run(cfg, recipe.model, run_dir / "data", None, out)
    return cfg, out, summary


def test_first_loss_is_the_loaded_models_loss_on_that_batch(micro_prepared, continued, base_dir):
    _, run_dir = micro_prepared
    cfg, out, summary = continued
    x, y = PackedLoader(run_dir / "data", cfg.seq_len, cfg.batch_size, cfg.seed).batch_at(0)
    want = _loss(load_model(base_dir), x, y)
    first = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r][0]
    assert first["step"] == 1 and first["loss"] == pytest.approx(want, rel=1e-5)
    # the starting point is scored before the first step, and logged as step 0
    start = read_metrics(out / "metrics.jsonl")[0]
    assert start["step"] == 0 and start["val_zh_bpb"] == summary["val_start"]["zh"]["bpb"]
    torch.manual_seed(cfg.seed)  # what training from scratch would have started from
    fresh = GPT(load_model(base_dir).cfg)
    assert abs(_loss(fresh, x, y) - want) > 1e-3
    assert (summary["model"]["dim"], summary["model"]["n_layer"]) == (48, 3)
    assert summary["init_from"] == str(base_dir)


def test_learning_rate_warms_up_again_from_zero(continued):
    cfg, out, _ = continued
    lrs = [r["lr"] for r in read_metrics(out / "metrics.jsonl") if "lr" in r]
    # warmup_steps 2: lr / 2, then the peak; a fresh optimizer, whatever the model had seen
    assert lrs == [pytest.approx(cfg.lr / 2), pytest.approx(cfg.lr)]
    assert lrs == [pytest.approx(lr_at(s, cfg)) for s in range(2)]


def test_result_opens_with_the_original_tokenizer_and_template(continued, base_dir):
    _, out, _ = continued
    model, tok = load(out / "model")
    base_tok = Tokenizer.load(base_dir)
    assert tok.fingerprint() == base_tok.fingerprint()
    assert tok.chat_template == base_tok.chat_template and tok.chat_template
    assert model.cfg.dim == 48
    trained = load_model(out / "model").state_dict()
    loaded = load_model(base_dir).state_dict()
    assert not torch.equal(trained["tok_emb.weight"], loaded["tok_emb.weight"])  # it trained


def test_recipe_model_section_is_ignored_with_a_notice(micro_prepared, base_dir, tmp_path, capsys):
    recipe, run_dir = micro_prepared
    pretrain.run(
        _cfg(recipe, base_dir, max_steps=1), recipe.model, run_dir / "data", None, tmp_path
    )
    err = capsys.readouterr().err
    assert "recipe's model settings are ignored" in err and "dim 32 -> 48" in err


def test_replay_rows_round_the_fraction_of_the_batch():
    assert [replay_rows(8, f) for f in (0.0, 0.2, 0.25, 0.5)] == [0, 2, 2, 4]
    assert replay_rows(10, 0.25) == 3  # 2.5 rounds half up
    with pytest.raises(DataError, match="makes 0 replay rows"):
        replay_rows(4, 0.1)


def test_replay_rows_come_from_the_replay_data(micro_prepared, base_dir, replay_dir, tmp_path):
    recipe, run_dir = micro_prepared
    cfg = _cfg(recipe, base_dir, replay=str(replay_dir), replay_fraction=0.25)  # 1 of 4 rows
    summary = pretrain.run(cfg, recipe.model, run_dir / "data", None, tmp_path)
    assert summary["replay"] == {
        "data": str(replay_dir), "fraction": 0.25, "rows_per_batch": 1, "batch_size": 4,
    }  # fmt: skip
    x, y = PackedLoader(run_dir / "data", cfg.seq_len, 3, cfg.seed).batch_at(0)
    rx, ry = PackedLoader(replay_dir, cfg.seq_len, 1, cfg.seed + 1).batch_at(0)
    want = _loss(load_model(base_dir), torch.cat([x, rx]), torch.cat([y, ry]))
    first = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r][0]
    assert first["loss"] == pytest.approx(want, rel=1e-5)
    assert "replay_en" in summary["val"]  # the general text's held-out loss is tracked too
    stored = json.loads((tmp_path / "run_config.json").read_text())["config"]
    assert stored["replay_dir"] == str(replay_dir.resolve()) and "replay_data" in stored


def test_replay_run_resumes_exactly(micro_prepared, base_dir, replay_dir, tmp_path):
    """Both loaders' positions are in the checkpoint: a run resumed after step 1 logs the
    uninterrupted run's losses."""
    recipe, run_dir = micro_prepared
    cfg = _cfg(recipe, base_dir, replay=str(replay_dir), replay_fraction=0.25, max_steps=3)
    cfg = dataclasses.replace(cfg, save_every=1, keep_last=5)
    full, part = tmp_path / "full", tmp_path / "part"
    pretrain.run(cfg, recipe.model, run_dir / "data", None, full)
    shutil.copytree(full / "checkpoints" / "step_000001", part / "checkpoints" / "step_000001")
    rows = [r for r in read_metrics(full / "metrics.jsonl") if r["step"] <= 1]
    (part / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copy(full / "run_config.json", part / "run_config.json")
    pretrain.run(cfg, recipe.model, run_dir / "data", None, part)

    def losses(d):
        return [(r["step"], r["loss"]) for r in read_metrics(d / "metrics.jsonl") if "loss" in r]

    assert losses(part) == losses(full) and len(losses(full)) == 3


def test_data_of_another_tokenizer_is_refused(micro_prepared, base_dir, tmp_path):
    recipe, run_dir = micro_prepared
    other_tok = tmp_path / "other_tok"
    # another vocabulary, made up for the test
    train_tokenizer(["the cat sat on the mat"] * 50 + ["猫坐在垫子上"] * 50, 300).save(other_tok)
    src = {"name": "shakespeare", "path": str(REPO / "datasets/tinyshakespeare/input.txt.gz"),
           "split_on": "blank_line", "max_docs": 20}  # fmt: skip
    data = DataConfig(sources=[src], val_fraction=0.1, num_workers=1)
    prepare.run(data, other_tok, recipe.base_dir, tmp_path / "other_data")
    with pytest.raises(ConfigError) as e:
        pretrain.run(
            _cfg(recipe, base_dir), recipe.model, tmp_path / "other_data", None, tmp_path / "a"
        )
    msg = str(e.value)
    assert "prepared with another tokenizer than the model's" in msg
    assert str(other_tok.resolve()) in msg and str(base_dir) in msg
    other_vocab = Tokenizer.load(other_tok).vocab_size  # at most 300: the corpus is tiny
    assert f"vocabulary {other_vocab}" in msg and "vocabulary 512" in msg
    assert not (tmp_path / "a").exists()  # refused before the run folder is made
    # the same for replay data
    cfg = _cfg(recipe, base_dir, replay=str(tmp_path / "other_data"), replay_fraction=0.25)
    with pytest.raises(ConfigError, match="prepared with another tokenizer"):
        pretrain.run(cfg, recipe.model, run_dir / "data", None, tmp_path / "b")


def test_cli_init_from_refuses_foreign_data_without_a_traceback(
    micro_recipe_path, micro_prepared, base_dir, tmp_path
):
    _, run_dir = micro_prepared
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    cli = [sys.executable, "-m", "lmforge", "pretrain", "--config", str(micro_recipe_path)]
    cli += ["--data-dir", str(run_dir / "data"), "--out", str(tmp_path / "run")]
    res = subprocess.run(
        [*cli, "--init-from", str(empty)], capture_output=True, text=True, timeout=120
    )
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert f"{empty} is not a model directory (no config.json in it)" in res.stderr
    # a tokenizer other than the model's, named explicitly, is refused too
    other = [*cli, "--init-from", str(base_dir), "--tokenizer-dir", str(REPO / "no_such")]
    res = subprocess.run(other, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "no tokenizer at" in res.stderr


def test_lmforge_run_continues_a_model_with_its_own_tokenizer(base_dir, tmp_path):
    """A recipe whose tokenizer stage copies the model's (tokenizer.path) and whose pretraining
    continues that model: the whole pipeline runs, and the result keeps the model's tokens."""
    from lmforge import pipeline
    from lmforge.config import load_recipe

    recipe = tmp_path / "cpt.yaml"
    recipe.write_text(
        f"""
data:
  sources: [{{name: enwiki, path: {REPO}/datasets/enwiki, format: jsonl, max_docs: 40}}]
  val_fraction: 0.1
  num_workers: 1
tokenizer: {{path: {base_dir}}}
pretrain: {{init_from: {base_dir}, max_steps: 2, batch_size: 4, seq_len: 32, warmup_steps: 1,
            eval_every: 0, eval_tokens: 512, save_every: 0, log_every: 1}}
sample: {{prompts: [Once], max_new_tokens: 4, chat_prompts: []}}
eval: {{tasks: []}}
""",
        encoding="utf-8",
    )
    res = pipeline.run(load_recipe(recipe), tmp_path / "out", log=lambda *a: None)
    assert res["pretrain"]["step"] == 2 and res["pretrain"]["init_from"] == str(base_dir)
    _, tok = load(tmp_path / "out" / "pretrain" / "model")
    assert tok.fingerprint() == Tokenizer.load(base_dir).fingerprint()


def test_replay_fraction_without_replay_data_is_a_config_error():
    from lmforge.config import PretrainConfig

    with pytest.raises(ConfigError, match="pretrain.replay names no data folder"):
        PretrainConfig(replay_fraction=0.2)
    with pytest.raises(ConfigError, match=r"replay_fraction must be in \[0, 1\)"):
        PretrainConfig(replay="x", replay_fraction=1.0)


@pytest.mark.slow
def test_smollm2_continues_on_chinese_lines(smollm2_dir, tmp_path):
    """Two steps of continued pretraining of the real SmolLM2 on a few Chinese lines: its own
    tokenizer frames each document with <|endoftext|> (id 0), the first loss is the loaded
    model's (a random 135M model would be near ln 49152 = 10.8), and the result chats with
    SmolLM2's template."""
    text = tmp_path / "zh.txt"
    # a few lines of the bundled 西游记, enough for a handful of 64-token windows
    with gzip.open(REPO / "datasets/chinese/novel_xiyou_ji.txt.gz", "rt", encoding="utf-8") as f:
        lines = [line.strip() for line in f if len(line.strip()) > 80][:12]
    text.write_text("\n".join(lines), encoding="utf-8")
    data = DataConfig(sources=[{"name": "zh", "path": str(text), "split_on": "line", "lang": "zh"}],
                      val_fraction=0.01, num_workers=1)  # fmt: skip
    manifest = prepare.run(data, smollm2_dir, str(tmp_path), tmp_path / "data")
    assert (manifest["dtype"], manifest["vocab_size"]) == ("uint16", 49152)
    assert manifest["doc_markers"] == {"start": [0], "end": []}  # <|endoftext|>, not <|im_end|>
    from lmforge.config import PretrainConfig

    cfg = PretrainConfig(
        init_from=str(smollm2_dir), max_steps=2, batch_size=2, seq_len=64, lr=1e-4,
        warmup_steps=2, eval_every=0, save_every=0, log_every=1, threads=2, device="cpu",
    )  # fmt: skip
    pretrain.run(cfg, ModelConfig(), tmp_path / "data", None, tmp_path / "run")
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 2 and losses[0] < 6.0
    model, tok = load(tmp_path / "run" / "model")
    assert tok.fingerprint() == Tokenizer.load(smollm2_dir).fingerprint()
    assert tok.render_chat([{"role": "user", "content": "hi"}], True).endswith(
        "<|im_start|>assistant\n"
    )
    assert model.cfg.n_layer == 30 and model.cfg.vocab_size == 49152


@pytest.fixture(scope="module")
def gqa_base_dir(micro_prepared, tmp_path_factory):
    """A base model whose fused q/k/v rows tensor parallelism must reorder (grouped-query
    attention with biases); random weights made up for the test."""
    _, run_dir = micro_prepared
    tok = Tokenizer.load(run_dir / "tokenizer")
    cfg = ModelConfig(
        vocab_size=tok.vocab_size, dim=32, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=64,
        arch="qwen2", qkv_bias=True, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
    )  # fmt: skip
    torch.manual_seed(11)
    d = tmp_path_factory.mktemp("gqa_base")
    save_model(GPT(cfg), d, tokenizer_dir=run_dir / "tokenizer", pad_token_id=tok.pad_id)
    return d


def _cli_losses(recipe_path, data_dir, out, base, nproc, *dist_opts) -> list[float]:
    """`lmforge pretrain --init-from base`, in one process or under torchrun (gloo, CPU)."""
    cli = ["-m", "lmforge", "pretrain", "--config", str(recipe_path), "--device", "cpu"]
    cli += ["--data-dir", str(data_dir), "--out", str(out), "--init-from", str(base)]
    cli += ["--batch_size", str(8 // (1 if "--dist.tp" in dist_opts else nproc))]
    cli += ["--max_steps", "2", "--eval_every", "0", "--log_every", "1", *dist_opts]
    if nproc > 1:
        cli = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cli]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, *cli], capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return [r["loss"] for r in read_metrics(out / "pretrain" / "metrics.jsonl") if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("opts", [["--dist.strategy", "fsdp"], ["--dist.tp", "2"]])
def test_sharded_init_from_loads_the_same_weights(
    opts, micro_recipe_path, micro_prepared, gqa_base_dir, tmp_path
):
    """FSDP2 and tensor parallelism fill each rank's slices from the loaded model (tp reorders
    the fused rows): two steps give the single process's losses on the same global batch."""
    _, run_dir = micro_prepared
    args = (micro_recipe_path, run_dir / "data")
    one = _cli_losses(*args, tmp_path / "one", gqa_base_dir, 1)
    two = _cli_losses(*args, tmp_path / "two", gqa_base_dir, 2, *opts)
    assert two == pytest.approx(one, rel=1e-5)
