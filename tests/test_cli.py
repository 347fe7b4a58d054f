"""The command line as a user runs it: a subprocess, end to end on the micro recipe."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest


def lmforge(*args, timeout=300, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "lmforge", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        **kw,
    )


def test_help_lists_every_option():
    out = lmforge("--help").stdout
    for cmd in ("run", "tokenizer", "prepare", "pretrain", "generate", "report"):
        assert cmd in out
    out = lmforge("pretrain", "--help").stdout
    assert "--max_steps" in out and "optimizer steps" in out and "--model.n_kv_head" in out


def test_run_end_to_end_then_skip_then_generate(micro_recipe_path, tmp_path):
    out = tmp_path / "run"
    r = lmforge("run", micro_recipe_path, "--out", out, "--pretrain.max_steps", 4)
    assert r.returncode == 0, r.stderr
    report = (out / "REPORT.md").read_text()
    for section in ("## Data", "## Pretraining", "## Samples", "bits per byte", "loss curve"):
        assert section in report
    assert "## Instruction tuning (SFT)" in report and "## Chat answers, model by model" in report
    assert "| alpaca_en |" in report and "before | after | change" in report
    assert "## Evaluation" in report and "| mmlu | acc | 2 |" in report
    assert (out / "eval" / "report_card.png").exists() and (
        out / "eval" / "sft" / "gsm8k.json"
    ).exists()
    assert "| en |" in report and "| zh |" in report
    samples = json.loads((out / "sample" / "samples.json").read_text())
    assert [s["prompt"] for s in samples] == ["Once upon a time", "话说"]
    chat = json.loads((out / "sample" / "chat.json").read_text())
    assert [c["prompt"] for c in chat] == ["Name a color."]
    assert list(chat[0]["answers"]) == ["pretrain", "sft", "dpo"]
    # reward model and DPO (judged by that reward model) ran after SFT
    assert "## Reward model" in report and "## Preference alignment (DPO)" in report
    assert "DPO wins" in report and (out / "eval" / "dpo" / "mmlu.json").exists()
    dpo = json.loads((out / "dpo" / "summary.json").read_text())
    assert dpo["judge"]["prompts"] == 4 and dpo["judge"]["judge"] == str(out / "reward" / "model")

    r = lmforge("run", micro_recipe_path, "--out", out, "--pretrain.max_steps", 4)
    assert r.returncode == 0 and r.stdout.count("up to date") == 8, r.stdout
    # a changed SFT setting redoes SFT and the samples, not the stages before them
    r = lmforge("run", micro_recipe_path, "--out", out, "--pretrain.max_steps", 4, "--sft.lr", 2e-3)
    assert r.returncode == 0 and r.stdout.count("up to date") == 3, r.stdout

    r = lmforge(
        "generate",
        out / "pretrain" / "model",
        "--prompt",
        "Once",
        "--max-new-tokens",
        5,
        "--seed",
        1,
    )
    assert r.returncode == 0 and r.stdout.startswith("Once"), r.stderr
    r = lmforge(
        "generate", out / "pretrain" / "model", "--prompt", "word " * 100, "--max-new-tokens", 5
    )
    assert r.returncode == 2 and "the model's context is 64" in r.stderr
    r = lmforge(
        "generate",
        out / "pretrain" / "model",
        "--prompt",
        "word " * 100,
        "--max-new-tokens",
        5,
        "--truncate",
    )
    assert r.returncode == 0, r.stderr


def test_bad_input_is_a_clear_error(micro_recipe_path, tmp_path):
    r = lmforge("run", micro_recipe_path, "--out", tmp_path, "--pretrain.max_step", 3)
    assert (
        r.returncode == 2 and "did you mean 'max_steps'" in r.stderr and "Traceback" not in r.stderr
    )
    r = lmforge("pretrain", "--config", micro_recipe_path, "--out", tmp_path, "--lr", "fast")
    assert r.returncode == 2 and "pretrain.lr must be a number, got 'fast'" in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  sources:\n    - {name: x, path: no/such/file.txt}\n")
    r = lmforge("run", bad, "--out", tmp_path / "r")
    assert r.returncode == 2 and "no/such/file.txt" in r.stderr and "Traceback" not in r.stderr
    r = lmforge("generate", tmp_path / "missing")
    assert r.returncode == 2 and "checkpoint directory not found" in r.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_saves_and_rerun_resumes(micro_recipe_path, micro_prepared, tmp_path):
    recipe_path = str(micro_recipe_path)
    run_dir = micro_prepared[1]
    out = tmp_path / "run"
    (out).mkdir()
    for d in ("tokenizer", "data"):
        os.symlink(run_dir / d, out / d)
    args = [
        "-m",
        "lmforge",
        "pretrain",
        "--config",
        recipe_path,
        "--out",
        str(out),
        "--max_steps",
        "100000",
        "--save_every",
        "0",
        "--eval_every",
        "0",
    ]
    proc = subprocess.Popen(
        [sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = out / "pretrain" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (
        metrics.exists() and metrics.read_text().count("\n") >= 3
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Run the same command to resume" in err
    ckpts = list((out / "pretrain" / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1
    step = int(ckpts[0].name.split("_")[1])
    assert step >= 3
    r = lmforge(
        "pretrain",
        "--config",
        recipe_path,
        "--out",
        out,
        "--max_steps",
        step + 2,
        "--eval_every",
        "0",
    )
    assert r.returncode == 0, r.stderr
    assert f"resuming from {ckpts[0]} (step {step})" in r.stderr


@pytest.mark.slow  # four runs of the command: about 25 s
def test_rerun_with_other_settings_or_without_resume_is_refused(
    micro_recipe_path, micro_prepared, tmp_path
):
    run_dir = micro_prepared[1]
    out = tmp_path / "run"
    out.mkdir()
    for d in ("tokenizer", "data"):
        os.symlink(run_dir / d, out / d)
    base = ["pretrain", "--config", micro_recipe_path, "--out", out, "--max_steps", 2]
    assert lmforge(*base).returncode == 0
    pre = out / "pretrain"
    kept = {p: p.read_bytes() for p in (pre / "model" / "model.safetensors", pre / "metrics.jsonl")}

    r = lmforge(*base, "--lr", "0.0083")  # resuming would jump the learning rate
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "pretrain.lr: 0.003 -> 0.0083" in r.stderr and "--overwrite" in r.stderr
    r = lmforge(*base, "--resume", "false")  # would overwrite the model and truncate the log
    assert r.returncode == 2 and "pretrain.resume is false" in r.stderr, r.stderr
    assert all(p.read_bytes() == b for p, b in kept.items())

    r = lmforge(*base, "--resume", "false", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert f"previous run moved to {out / 'pretrain.old'}" in r.stderr
    assert (out / "pretrain.old" / "model" / "model.safetensors").read_bytes() == next(
        iter(kept.values())
    )
    assert (pre / "model").is_dir()


def test_align_stages_start_from_what_sft_wrote(tmp_path):
    """After a LoRA SFT a bare `lmforge dpo` (reward, ppo, grpo) starts from OUT/sft/adapter;
    after full SFT from OUT/sft/model; before either, the missing OUT/sft/model is named."""
    from lmforge.stages import output_dir

    assert output_dir(tmp_path, "sft") == tmp_path / "sft" / "model"
    (tmp_path / "sft" / "adapter").mkdir(parents=True)
    assert output_dir(tmp_path, "sft") == tmp_path / "sft" / "adapter"
    (tmp_path / "sft" / "model").mkdir()
    assert output_dir(tmp_path, "sft") == tmp_path / "sft" / "model"
    # from the config, before the stage has run: LoRA (r > 0) writes the adapter
    assert output_dir(tmp_path, "dpo", 8) == tmp_path / "dpo" / "adapter"
    assert output_dir(tmp_path, "dpo", 0) == tmp_path / "dpo" / "model"


def test_one_lora_knob_for_sft_and_dpo(micro_recipe_path):
    """`--lora.KEY` sets the adapters of the stage the command runs (sft.lora, dpo.lora);
    `lmforge run` spells them --sft.lora.KEY. The old --lora_r (dpo) and --lora.KEY of
    `lmforge run` (the top-level section) give the same config."""
    from lmforge import cli
    from lmforge.config import LoRAConfig, load_recipe

    def stage(cmd, *options):
        argv = [cmd, "--config", str(micro_recipe_path), *map(str, options)]
        return cli._stage_recipe(*cli._parser().parse_known_args(argv))[1]

    sft = stage("sft", "--lora.r", 8, "--lora.targets", "q,v")
    assert sft.sft.lora == LoRAConfig(r=8, targets=["q", "v"]) and sft.dpo.lora.r == 0
    dpo = stage("dpo", "--lora.r", 4, "--lora.alpha", 8)
    assert dpo.dpo.lora == LoRAConfig(r=4, alpha=8) and dpo.sft.lora.r == 0
    assert stage("dpo", "--lora_r", 4, "--lora.alpha", 8) == dpo
    assert stage("sft", "--dpo.lora.r", 4, "--dpo.lora.alpha", 8) == dpo

    def run(*options):
        return load_recipe(micro_recipe_path, cli._split_overrides(list(options), None))

    assert run("--lora.r", "8", "--lora.alpha", "8") == run(
        "--sft.lora.r", "8", "--sft.lora.alpha", "8", "--dpo.lora.alpha", "8"
    )


@pytest.mark.slow  # four runs of the command: about 90 s with the micro fixtures
def test_lora_sft_then_a_bare_dpo_and_lora_dpo_in_both_spellings(
    micro_recipe_path, micro_pretrained, tmp_path
):
    out = tmp_path / "run"
    (out / "pretrain").mkdir(parents=True)
    os.symlink(micro_pretrained[1], out / "pretrain" / "model")
    base = ["--config", micro_recipe_path, "--out", out, "--max_steps", 1]
    r = lmforge("sft", *base, "--lora.r", 4)
    assert r.returncode == 0, r.stderr
    assert f"adapter written to {out / 'sft' / 'adapter'}" in r.stdout, r.stdout
    assert "deprecated" not in r.stderr
    r = lmforge("dpo", *base)  # no --model-dir: the adapter SFT wrote (full DPO on it)
    assert r.returncode == 0, r.stderr
    assert (out / "dpo" / "model" / "model.safetensors").is_file()

    # LoRA DPO starts from a plain model (on an adapter it is refused: merge first)
    other = ["--config", micro_recipe_path, "--max_steps", 1, "--model-dir", micro_pretrained[1]]
    r = lmforge("dpo", *other, "--out", tmp_path / "new", "--lora.r", 4)
    assert r.returncode == 0 and "deprecated" not in r.stderr, r.stderr
    r = lmforge("dpo", *other, "--out", tmp_path / "old", "--lora_r", 4)
    assert r.returncode == 0, r.stderr
    assert "dpo.lora_r (--lora_r) is deprecated" in r.stderr and "use dpo.lora.r" in r.stderr
    for d in ("new", "old"):
        assert (tmp_path / d / "dpo" / "adapter" / "adapter_config.json").is_file()
        assert not (tmp_path / d / "dpo" / "model").exists()
