"""Recipes: strict keys with suggestions, typed overrides, validation, stable hashes."""

import pytest

from lmforge.config import (
    ConfigError,
    DPOConfig,
    ModelConfig,
    PretrainConfig,
    build,
    config_hash,
    field_help,
    load_recipe,
)


def test_unknown_keys_name_the_closest_valid_key(tmp_path):
    with pytest.raises(
        ConfigError, match="unknown key 'max_step' in pretrain; did you mean 'max_steps'"
    ):
        build(PretrainConfig, {"max_step": 3}, "pretrain")
    with pytest.raises(ConfigError, match="unknown key 'pretrian'.*did you mean 'pretrain'"):
        load_recipe(None, {"pretrian.max_steps": 3})
    r = tmp_path / "r.yaml"
    r.write_text("modle:\n  dim: 64\n")
    with pytest.raises(ConfigError, match="unknown key 'modle'.*did you mean 'model'"):
        load_recipe(r)


def test_overrides_are_typed(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("pretrain:\n  lr: 1.0e-3\nmodel:\n  dim: 64\n  n_head: 2\n")
    rec = load_recipe(
        r, {"pretrain.max_steps": "20", "pretrain.lr": "3e-4", "model.tie_embeddings": "false"}
    )
    assert rec.pretrain.max_steps == 20 and rec.pretrain.lr == 3e-4
    assert rec.model.tie_embeddings is False and rec.model.dim == 64
    assert rec.base_dir == str(tmp_path.resolve())
    with pytest.raises(ConfigError, match="pretrain.max_steps must be an integer, got '2.5'"):
        load_recipe(r, {"pretrain.max_steps": "2.5"})
    with pytest.raises(ConfigError, match="pretrain.compile must be true or false"):
        load_recipe(r, {"pretrain.compile": "maybe"})


def test_validation_messages():
    with pytest.raises(ConfigError, match="must be divisible by model.n_head"):
        ModelConfig(dim=100, n_head=3)
    with pytest.raises(ConfigError, match="pretrain.schedule must be one of cosine, wsd, constant"):
        PretrainConfig(schedule="linear")
    with pytest.raises(ConfigError, match="pretrain.batch_size must be positive"):
        PretrainConfig(batch_size=0)


def test_bad_yaml_is_a_clear_error(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("pretrain: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(r)
    with pytest.raises(ConfigError, match="recipe not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_derived_fields_and_hash():
    m = ModelConfig(dim=256, n_head=4)
    assert m.n_kv_head == 4 and m.ffn_dim == 704 and m.head_dim == 64
    assert config_hash(m) == config_hash(ModelConfig(dim=256, n_head=4))
    assert config_hash(m) != config_hash(ModelConfig(dim=256, n_head=8))


def test_every_field_has_help():
    from lmforge.config import SECTIONS

    for cls in SECTIONS.values():
        helps = field_help(cls)
        missing = [f for f in cls.__dataclass_fields__ if f not in helps]
        assert not missing, (cls.__name__, missing)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"dim": "256"}, "model.dim must be an integer, got '256'"),
        ({"n_layer": True}, "model.n_layer must be an integer, got True"),
        ({"n_head": 2.5}, "model.n_head must be an integer, got 2.5"),
        ({"rope_theta": "big"}, "model.rope_theta must be a number"),
        ({"norm_eps": float("nan")}, "model.norm_eps must be a finite number"),
        ({"tie_embeddings": "no"}, "model.tie_embeddings must be true or false"),
        ({"arch": ["llama"]}, "model.arch must be a string"),
        ({"vocab_size": -1}, "model.vocab_size must be >= 0"),
        ({"n_kv_head": -2}, "model.n_kv_head must be >= 0"),
        ({"max_seq_len": 0}, "model.max_seq_len must be positive"),
        ({"rope_theta": 0.0}, "model.rope_theta must be positive"),
        ({"n_layer": 1_000_000}, r"model.n_layer \(1000000\) is over 1024"),
        ({"dim": 64, "n_head": 3}, r"model.dim \(64\) must be divisible by model.n_head \(3\)"),
    ],
)
def test_model_config_refuses_wrong_types_and_ranges(kw, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**kw)


def test_model_config_accepts_numbers_as_json_gives_them():
    cfg = ModelConfig(rope_theta=500000, init_std=0, vocab_size=320)  # ints for floats
    assert cfg.rope_theta == 500000.0 and isinstance(cfg.rope_theta, float)


def test_a_recipe_model_section_that_is_a_list_is_an_error(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("model: [1, 2]\n")
    with pytest.raises(ConfigError, match="model must be a mapping"):
        load_recipe(r)


def test_the_old_lora_spellings_give_the_same_config_with_a_deprecation(tmp_path, capsys):
    # made-up recipes: the old top-level `lora:` (all of it to sft; alpha, dropout and targets
    # to dpo) with dpo.lora_r, and the same written with each stage's own `lora:`
    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old.write_text("lora: {r: 8, alpha: 32, targets: [q, v]}\ndpo: {lora_r: 4}\n")
    new.write_text(
        "sft: {lora: {r: 8, alpha: 32, targets: [q, v]}}\n"
        "dpo: {lora: {r: 4, alpha: 32, targets: [q, v]}}\n"
    )
    assert load_recipe(new) == load_recipe(old)
    err = capsys.readouterr().err
    assert "the top-level `lora:` section (--lora.KEY in lmforge run) is deprecated" in err
    assert "use sft.lora / dpo.lora in a recipe" in err
    assert "dpo.lora_r (--lora_r) is deprecated" in err and "use dpo.lora.r" in err
    r = load_recipe(new, {"sft.lora.r": 16, "dpo.lora.dropout": 0.1})
    assert r.sft.lora.r == 16 and r.dpo.lora.dropout == 0.1
    assert load_recipe(None, {"lora.r": 8}) == load_recipe(None, {"sft.lora.r": 8})
    assert load_recipe(None, {"dpo.lora_r": 4}) == load_recipe(None, {"dpo.lora.r": 4})
    assert DPOConfig(lora_r=4).lora.r == 4  # a driver given the old field trains rank 4
    capsys.readouterr()
    load_recipe(new)
    assert capsys.readouterr().err == ""  # the new spelling says nothing


def test_the_lora_spellings_must_agree_and_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"lora.r \(8, the old spelling\) and sft.lora.r"):
        load_recipe(None, {"lora.r": 8, "sft.lora.r": 4})
    with pytest.raises(ConfigError, match=r"dpo.lora_r \(4\) and dpo.lora.r \(8\) disagree"):
        load_recipe(None, {"dpo.lora_r": 4, "dpo.lora.r": 8})
    with pytest.raises(
        ConfigError, match="unknown key 'rank' in sft.lora; valid keys: alpha, dropout, r, targets"
    ):
        load_recipe(None, {"sft.lora.rank": 8})
    with pytest.raises(ConfigError, match="unknown key 'alfa' in section 'lora'"):
        load_recipe(None, {"lora.alfa": 8})
    with pytest.raises(ConfigError, match="lora.targets: unknown projection 'qq'"):
        load_recipe(None, {"dpo.lora.targets": "qq"})
    r = tmp_path / "r.yaml"
    r.write_text("sft: {lora: 8}\n")
    with pytest.raises(ConfigError, match="sft.lora must be a mapping"):
        load_recipe(r)
