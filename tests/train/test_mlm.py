"""MLM pretraining of the encoder: the 15% / 80-10-10 masking, the loss against transformers'
BertForMaskedLM, a few steps through the common clock (train/loop.py:fit) lowering it, and
`lmforge pretrain` with an encoder config: the run, its exact resume, the saved
BertForMaskedLM directory against transformers, the mask token, and the errors."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.config import ConfigError, ModelConfig, PretrainConfig, load_recipe, model_family
from lmforge.data.loader import PackedLoader
from lmforge.model.bert import Bert, BertConfig, from_hf_state_dict, load_bert, to_hf_config
from lmforge.tokenizer import Tokenizer
from lmforge.train import mlm, pretrain
from lmforge.train.checkpoint import list_checkpoints
from lmforge.train.loop import fit
from lmforge.train.metrics import read_metrics
from lmforge.train.mlm import IGNORE, mask_tokens, mlm_loss, mlm_train_step

REPO = Path(__file__).resolve().parents[2]
MASK = 3  # made up: a tiny vocabulary where 0 is padding and 3 is [MASK]


def test_masking_is_15_percent_of_real_tokens_80_10_10():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 1000, (64, 512), generator=g)  # made-up tokens
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -100:] = True  # [CLS] and padding
    inputs, labels = mask_tokens(ids, special, MASK, 1000, torch.Generator().manual_seed(1))
    target = labels != IGNORE
    assert not target[special].any()
    assert (labels[target] == ids[target]).all() and (inputs[~target] == ids[~target]).all()
    frac = target.sum() / (~special).sum()
    assert 0.14 < frac < 0.16
    masked = (inputs[target] == MASK).float().mean()
    kept = (inputs[target] == ids[target]).float().mean()
    assert 0.78 < masked < 0.82 and 0.08 < kept < 0.12  # random: the rest, ~10%


def test_loss_equals_transformers():
    transformers = pytest.importorskip("transformers", reason="the reference loss")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, dim=32, n_layer=2, n_head=4, ffn_dim=64, max_seq_len=16)
    theirs = transformers.BertForMaskedLM(transformers.BertConfig(**to_hf_config(cfg, True)))
    ours = Bert(cfg, mlm_head=True)
    ours.load_state_dict(from_hf_state_dict(theirs.eval().state_dict(), cfg))
    ids = torch.randint(4, 50, (3, 16))  # made up
    attn = torch.ones_like(ids)
    inputs, labels = mask_tokens(ids, ~attn.bool(), MASK, 50, torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss_sum, n = mlm_loss(ours.eval(), inputs, labels, attn)
        ref = theirs(input_ids=inputs, attention_mask=attn, labels=labels).loss
    torch.testing.assert_close(loss_sum / n, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # 40 optimizer steps
def test_a_few_steps_through_fit_lower_the_loss(tmp_path):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=24, dim=32, n_layer=2, n_head=4, ffn_dim=64, max_seq_len=16)
    model = Bert(cfg, mlm_head=True).train()
    # made-up data: each row repeats one token, so a masked token is its neighbours' token
    rows = (torch.arange(20) + 4).unsqueeze(1).repeat(1, 16)

    def batches():
        g = torch.Generator().manual_seed(0)
        while True:
            ids = rows[torch.randint(0, 20, (32,), generator=g)]
            yield ids, torch.ones_like(ids), torch.zeros_like(ids, dtype=torch.bool)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    run = PretrainConfig(max_steps=40, lr=1e-2, warmup_steps=5, log_every=10, eval_every=0,
                         save_every=0)  # fmt: skip
    step = mlm_train_step(model, opt, batches(), MASK)
    out = fit(run, opt, step, None, lambda s, state: None, out_dir=tmp_path, desc="mlm")
    losses = [row["loss"] for row in read_metrics(tmp_path / "metrics.jsonl") if "loss" in row]
    assert out["step"] == 40 and len(losses) == 4
    assert losses[-1] < 0.7 * losses[0], losses


# --- `lmforge pretrain` with an encoder config (model.arch bert), on the micro recipe's shards

# what makes the `model:` section an encoder (model.arch bert and the features it computes with)
ENCODER = dict(arch="bert", norm="layernorm", mlp="gelu", pos="learned", qkv_bias=True, bias=True)


def _encoder_cfg(**kw) -> ModelConfig:
    return ModelConfig(dim=32, n_layer=2, n_head=2, max_seq_len=64, **ENCODER, **kw)


def _losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def encoder_run(micro_prepared, tmp_path_factory):
    """The micro recipe's 8 steps (checkpoints at 4 and 8) with a micro encoder."""
    recipe, run_dir = micro_prepared
    out = tmp_path_factory.mktemp("mlm_full")
    summary = pretrain.run(
        recipe.pretrain, _encoder_cfg(), run_dir / "data", run_dir / "tokenizer", out
    )
    return recipe, run_dir, out, summary


def test_pretrain_trains_an_encoder_and_writes_bert_for_masked_lm(encoder_run):
    recipe, run_dir, out, summary = encoder_run
    assert summary["step"] == 8 and summary["objective"] == "masked-lm"
    # the micro tokenizer (512 ids) has no mask token: <|mask|> is appended as id 512
    assert summary["mask"] == {"token": "<|mask|>", "id": 512, "appended": True}
    assert summary["model"]["vocab_size"] == 513
    assert set(summary["val"]) == {"en", "zh"} and set(summary["val_start"]) == {"en", "zh"}
    for lang, r in summary["val"].items():
        assert 0 <= r["acc"] <= 1 and r["loss"] < summary["val_start"][lang]["loss"], lang
    rows = read_metrics(out / "metrics.jsonl")
    assert {"val_en_loss", "val_en_acc", "val_zh_acc"} <= set(rows[0])  # step 0: the baseline
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["architectures"] == ["BertForMaskedLM"] and cfg["vocab_size"] == 513
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_000004", "step_000008"]


def test_resume_reproduces_the_uninterrupted_encoder_run(encoder_run, tmp_path):
    recipe, run_dir, out, _ = encoder_run
    # a run that stopped after step 4: only its step-4 checkpoint and its metrics up to 4 exist
    shutil.copytree(out / "checkpoints" / "step_000004", tmp_path / "checkpoints" / "step_000004")
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in read_metrics(out / "metrics.jsonl") if r["step"] <= 4)
    )
    pretrain.run(recipe.pretrain, _encoder_cfg(), run_dir / "data", run_dir / "tokenizer", tmp_path)
    assert _losses(tmp_path) == _losses(out)  # bit-for-bit equal floats, steps 1..8
    val = lambda d: [r for r in read_metrics(d / "metrics.jsonl") if "val_en_acc" in r]  # noqa: E731
    assert val(tmp_path) == val(out)


def test_saved_encoder_opens_in_transformers_with_equal_logits(encoder_run):
    transformers = pytest.importorskip("transformers", reason="the reference implementation")
    _, _, out, _ = encoder_run
    ours = load_bert(out / "model")
    theirs = transformers.BertForMaskedLM.from_pretrained(out / "model").eval()
    ids = torch.randint(0, 513, (2, 32), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    attn[1, 20:] = 0  # padding in the second row
    with torch.no_grad():
        mine = ours.mlm_logits(ours(ids, attn))
        ref = theirs(input_ids=ids, attention_mask=attn).logits
    torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(out / "model")
    assert (tok.mask_token, tok.mask_token_id) == ("<|mask|>", 512)
    assert Tokenizer.load(out / "model").token_id("<|mask|>") == 512


def test_special_tokens_are_never_masked_on_a_packed_batch(micro_prepared):
    """Statistics of the rule on the real packed stream (BOS/EOS between documents)."""
    _, run_dir = micro_prepared
    tok = Tokenizer.load(run_dir / "tokenizer")
    mask = mlm.mask_token(tok)
    special = mlm.special_ids(tok, 520, mask)  # a padded vocabulary: ids 513.. are special too
    assert special[[tok.bos_id, tok.eos_id, tok.pad_id, mask.id, 519]].all()
    assert not special[tok.encode("hello world")].any()
    loader = PackedLoader(run_dir / "data", 32, 512, seed=0)  # 16,384 tokens
    ids, attn, is_special = next(mlm.packed_batches(loader, special))
    assert attn.all() and is_special.sum() > 10  # the packed windows hold document boundaries
    inputs, labels = mask_tokens(ids, is_special, mask.id, 520, torch.Generator().manual_seed(0))
    target = labels != IGNORE
    assert not target[is_special].any()
    assert 0.14 < target.sum() / (~is_special).sum() < 0.16
    assert 0.77 < (inputs[target] == mask.id).float().mean() < 0.83


def test_an_existing_mask_token_is_reused(micro_prepared, tmp_path):
    _, run_dir = micro_prepared
    tok_json = json.loads((run_dir / "tokenizer" / "tokenizer.json").read_text())
    # made up: the micro tokenizer with [MASK] as one more special token
    tok_json["added_tokens"].append(
        dict(id=512, content="[MASK]", single_word=False, lstrip=False, rstrip=False,
             normalized=False, special=True)
    )  # fmt: skip
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok_json))
    tok = Tokenizer.load(tmp_path / "tokenizer.json")
    cfg, mask = mlm.encoder_vocab(_encoder_cfg(), tok)
    assert mask == mlm.MaskToken("[MASK]", 512, new=False) and cfg.vocab_size == 513


def test_a_vocabulary_without_room_for_the_mask_token_is_refused(micro_prepared, tmp_path):
    recipe, run_dir = micro_prepared
    with pytest.raises(ConfigError, match=r"model.vocab_size \(512\) is too small for masked-LM"):
        pretrain.run(
            recipe.pretrain, _encoder_cfg(vocab_size=512), run_dir / "data",
            run_dir / "tokenizer", tmp_path,
        )  # fmt: skip


def test_decoder_only_options_are_refused_for_an_encoder(micro_prepared, tmp_path):
    recipe, run_dir = micro_prepared
    cfg = dataclasses.replace(recipe.pretrain, init_from=str(tmp_path))
    with pytest.raises(ConfigError, match="init_from: not supported for an encoder"):
        pretrain.run(cfg, _encoder_cfg(), run_dir / "data", run_dir / "tokenizer", tmp_path)
    with pytest.raises(ConfigError, match=r"model.arch 'bert' is an encoder: rope_scaling"):
        _encoder_cfg(rope_scaling={"rope_type": "linear", "factor": 2.0})


@pytest.mark.parametrize("p", [0.0, 1.0, -0.1])
def test_a_bad_masking_fraction_is_refused(p):
    with pytest.raises(ConfigError, match=rf"pretrain.mask_fraction must be in \(0, 1\).*{p}"):
        PretrainConfig(mask_fraction=p)


def test_cli_errors_name_the_problem_without_a_traceback(
    micro_recipe_path, micro_prepared, tmp_path
):
    _, run_dir = micro_prepared
    cli = [sys.executable, "-m", "lmforge", "pretrain", "--config", str(micro_recipe_path)]
    cli += ["--data-dir", str(run_dir / "data"), "--tokenizer-dir", str(run_dir / "tokenizer")]
    cli += ["--out", str(tmp_path), *(f"--model.{k}={v}" for k, v in ENCODER.items())]
    for extra, message in (
        (["--mask_fraction", "1.5"], "pretrain.mask_fraction must be in (0, 1)"),
        (["--model.vocab_size", "512"], "model.vocab_size (512) is too small for masked-LM"),
    ):
        res = subprocess.run([*cli, *extra], capture_output=True, text=True, timeout=120)
        assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert message in res.stderr


def test_lmforge_run_refuses_an_encoder_before_any_stage(micro_recipe_path, tmp_path):
    from lmforge import pipeline

    recipe = dataclasses.replace(load_recipe(micro_recipe_path), model=_encoder_cfg())
    with pytest.raises(ConfigError, match="is an encoder: `lmforge run` chains decoder stages"):
        pipeline.run(recipe, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_encoder_recipe_builds_the_measured_model():
    recipe = load_recipe(REPO / "recipes" / "encoder-mlm.yaml")
    assert model_family(recipe.model) == "encoder" and recipe.pretrain.mask_fraction == 0.15
    cfg = dataclasses.replace(recipe.model, vocab_size=8193)  # the tiny tokenizer + <|mask|>
    model = Bert(mlm.bert_config(cfg, pad_token_id=0), mlm_head=True)
    assert sum(p.numel() for p in model.parameters()) == 3_448_065  # docs/embeddings.md
