"""Stage bookkeeping: skip when up to date, resume when unfinished, move aside when changed."""

import json

import pytest

from lmforge.pipeline import Interrupted, run_stage


def test_skip_resume_and_move_aside(tmp_path):
    calls = []

    def fn(d):
        calls.append(d)
        (d / "out.txt").write_text("x")
        return {"n": len(calls)}

    assert run_stage("s", tmp_path, "h1", fn, log=lambda m: None) == {"n": 1}
    assert run_stage("s", tmp_path, "h1", fn, log=lambda m: None) == {"n": 1}  # skipped
    assert len(calls) == 1
    assert run_stage("s", tmp_path, "h2", fn, log=lambda m: None) == {"n": 2}  # config changed
    assert (tmp_path / "s.h1" / "out.txt").exists()  # the old output is kept, not deleted
    assert json.loads((tmp_path / "s" / "stage.json").read_text())["hash"] == "h2"
    run_stage("s", tmp_path, "h3", fn, force=False, log=lambda m: None)
    run_stage("s", tmp_path, "h3", fn, force=True, log=lambda m: None)
    assert (tmp_path / "s.h3").exists() and len(calls) == 4


def test_unfinished_stage_resumes_in_place(tmp_path):
    def interrupted(d):
        (d / "partial.txt").write_text("x")
        return {"interrupted": True}

    with pytest.raises(Interrupted):
        run_stage("s", tmp_path, "h1", interrupted, log=lambda m: None)
    assert json.loads((tmp_path / "s" / "stage.json").read_text()) == {"hash": "h1", "done": False}
    seen = []
    run_stage(
        "s", tmp_path, "h1", lambda d: seen.append((d / "partial.txt").exists()), log=lambda m: None
    )
    assert seen == [True]  # same folder, partial work still there to resume from


def _base_recipe(micro_recipe_path, model_dir, tmp_path, **extra):
    """The micro recipe started from an existing model directory instead of pretraining:
    LoRA SFT, reward, full DPO, int8 and GPTQ, every model evaluated."""
    import yaml

    from lmforge.config import load_recipe

    raw = yaml.safe_load(micro_recipe_path.read_text(encoding="utf-8"))
    for section in ("tokenizer", "model", "pretrain"):
        raw.pop(section)
    raw["base"] = {"model": str(model_dir)}
    raw["sft"]["lora"] = {"r": 4}
    raw["quantize"] = {"methods": ["int8", "gptq"], "group_size": 32, "calib_samples": 4}
    raw["quantize"] |= {"calib_seq_len": 32, "eval_tokens": 512}
    raw["eval"] = {"tasks": ["mmlu", "lm:data"], "limit": 2, "limits": {"lm:data": 300}}
    raw["eval"]["models"] = ["base", "sft", "dpo", "int8", "gptq-g32"]
    for section, values in extra.items():
        raw[section] = raw.get(section, {}) | values
    path = tmp_path / "from_base.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return load_recipe(path)


@pytest.mark.slow
def test_run_from_an_existing_model(micro_recipe_path, micro_pretrained, tmp_path):
    from lmforge.pipeline import run

    _, model_dir = micro_pretrained
    recipe = _base_recipe(micro_recipe_path, model_dir, tmp_path)
    out, logs = tmp_path / "run", []
    run(recipe, out, log=logs.append)
    # no tokenizer, no pretraining: the base model's own tokenizer prepared the data
    assert not (out / "tokenizer").exists() and not (out / "pretrain").exists()
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert (
        manifest["vocab_size"] == json.loads((model_dir / "config.json").read_text())["vocab_size"]
    )
    assert (out / "sft" / "adapter").is_dir() and (out / "dpo" / "model").is_dir()
    assert sorted(p.name for p in (out / "quantize").iterdir() if p.is_dir()) == [
        "gptq-g32",
        "int8",
    ]
    sft = json.loads((out / "sft" / "summary.json").read_text())
    by_source = sft["val_loss_by_source"]
    assert set(by_source) == {"alpaca_en", "alpaca_zh"}
    assert all(v["before"] > 0 and v["after"] > 0 for v in by_source.values())
    chat = json.loads((out / "sample" / "chat.json").read_text())
    assert list(chat[0]["answers"]) == ["base", "sft", "dpo", "int8", "gptq-g32"]
    report = (out / "REPORT.md").read_text()
    for heading in ("## Base model", "## Quantization", "## Evaluation", "## Chat answers"):
        assert heading in report
    assert "| mmlu | acc | 2 | " in report
    header = next(line for line in report.splitlines() if line.startswith("| task | metric"))
    assert header.endswith("| base | sft | dpo | int8 | gptq-g32 |")
    safe = f"lm_{out / 'data'}".replace("/", "_")
    lm = json.loads((out / "eval" / "int8" / f"{safe}.json").read_text())
    assert lm["config"]["limit"] == 300  # its own limit, not the 2 questions of mmlu
    # the run's own data folder is named relative to the run
    assert any(line.startswith("| lm:data:zh | bits_per_byte") for line in report.splitlines())
    # a second run finds every stage up to date
    logs.clear()
    run(recipe, out, log=logs.append)
    ran = [m for m in logs if m.startswith("[") and "up to date" not in m]
    assert not ran, ran


def test_a_bad_base_model_is_refused_by_name(micro_recipe_path, tmp_path):
    from lmforge.config import ConfigError
    from lmforge.pipeline import run

    recipe = _base_recipe(micro_recipe_path, tmp_path / "nowhere", tmp_path)
    with pytest.raises(ConfigError, match="neither a model `lmforge fetch` knows"):
        run(recipe, tmp_path / "run", log=lambda m: None)


def test_dpo_lora_on_an_adapter_is_refused(micro_recipe_path, tmp_path):
    from lmforge.align import dpo
    from lmforge.config import ConfigError, load_recipe

    adapter = tmp_path / "adapter"  # made up: only its config is read before the refusal
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": str(tmp_path), "r": 4})
    )
    recipe = load_recipe(micro_recipe_path, {"dpo.lora.r": 4})
    with pytest.raises(ConfigError, match="merge it first"):
        dpo.run(recipe.dpo, recipe.dpo.lora, adapter, tmp_path / "out", recipe.base_dir)


def test_eval_limits_and_quantize_methods_are_checked(micro_recipe_path):
    from lmforge.config import ConfigError, load_recipe

    with pytest.raises(ConfigError, match="eval.limits: 'gsm9k' is not one of eval.tasks"):
        load_recipe(micro_recipe_path, {"eval.limits": {"gsm9k": 3}})
    with pytest.raises(ConfigError, match="eval.limits.gsm8k must be an integer >= 0"):
        load_recipe(micro_recipe_path, {"eval.limits": {"gsm8k": -1}})
    with pytest.raises(ConfigError, match="quantize.methods: 'nf4' is not one of"):
        load_recipe(micro_recipe_path, {"quantize.methods": ["int8", "nf4"]})
    with pytest.raises(ConfigError, match="eval.models: unknown model 'int3'"):
        load_recipe(micro_recipe_path, {"eval.models": ["base", "int3"]})
    with pytest.raises(ConfigError, match="eval.limits must be a mapping"):
        load_recipe(micro_recipe_path, {"eval.limits": "gsm8k"})
    recipe = load_recipe(micro_recipe_path, {"eval.limits": "{gsm8k: 3}"})  # as typed in a shell
    assert recipe.eval.limits == {"gsm8k": 3}
    recipe = load_recipe(micro_recipe_path, {"eval.models": ["base", "int8", "gptq-g64"]})
    assert recipe.eval.models == ["base", "int8", "gptq-g64"]


def test_the_stage_table_is_what_the_run_and_its_config_use(micro_recipe_path, tmp_path):
    from lmforge.config import RUN_MODELS, SECTIONS, load_recipe
    from lmforge.pipeline import model_dirs, stage_hashes
    from lmforge.stages import BY_NAME, MODEL_STAGES, RUN_ORDER, TABLE, output_dir

    recipe = load_recipe(micro_recipe_path, {"sft.lora.r": 4, "dpo.lora.r": 2})
    assert tuple(stage_hashes(recipe)) == RUN_ORDER
    assert set(MODEL_STAGES) == set(RUN_MODELS)  # what eval.models accepts
    assert all(s.section in SECTIONS for s in TABLE)
    assert all(BY_NAME[s.model_from].title for s in TABLE if s.model_from)  # starts from a model
    root = tmp_path / "pretrain" / "model"
    dirs = model_dirs(recipe, tmp_path, root)  # LoRA SFT, LoRA DPO: both write adapters
    assert dirs == {
        "pretrain": root,
        "sft": output_dir(tmp_path, "sft", 4),
        "dpo": tmp_path / "dpo" / "adapter",
    }
    full = model_dirs(load_recipe(micro_recipe_path), tmp_path, root)
    assert full["sft"] == tmp_path / "sft" / "model" and full["dpo"] == tmp_path / "dpo" / "model"
