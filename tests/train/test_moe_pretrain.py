"""`lmforge pretrain` of a micro mixture of experts (model.arch mixtral) through the command line:
its first losses pinned, the MoE metrics logged, and the saved model opening with `load` and
generating with `lmforge generate`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.model.load import load
from lmforge.model.moe import MoE
from lmforge.train.metrics import read_metrics

# the micro recipe's model with 4 experts, top-2: measured when the MoE was added (one thread)
PINNED_LOSSES = [6.262563228607178, 6.234828948974609, 6.237075328826904]
MOE = dict(arch="mixtral", mlp="moe", n_experts=4, experts_per_token=2)


# Qwen2-MoE with its shared expert, unnormalised top-k weights and a capacity that drops slots
QWEN2_MOE = dict(arch="qwen2_moe", mlp="moe", qkv_bias="true", n_experts=4, norm_topk="false")
QWEN2_MOE |= dict(shared_expert_dim=64, capacity_factor=1.0)
PINNED_QWEN2_MOE = [6.2646589279174805, 6.235665798187256, 6.23852014541626]


def pretrain_cli(recipe_path, run_dir, out, model: dict) -> Path:
    """`lmforge pretrain` of the micro recipe for 3 steps, one thread, with model overrides."""
    cli = [sys.executable, "-m", "lmforge", "pretrain", "--config", str(recipe_path)]
    cli += ["--data-dir", str(run_dir / "data"), "--tokenizer-dir", str(run_dir / "tokenizer")]
    cli += ["--out", str(out), "--device", "cpu", "--threads", "1", "--max_steps", "3"]
    cli += ["--eval_every", "0", "--save_every", "0"]
    cli += [f"--model.{k}={v}" for k, v in model.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cli, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return out / "pretrain"


@pytest.fixture(scope="module")
def moe_run(micro_recipe_path, micro_prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe_pretrain")
    return pretrain_cli(micro_recipe_path, micro_prepared[1], out, MOE)


def test_qwen2_moe_with_capacity_pins_its_losses_and_drops_slots(
    micro_recipe_path, micro_prepared, tmp_path
):
    run = pretrain_cli(micro_recipe_path, micro_prepared[1], tmp_path, QWEN2_MOE)
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    print(json.dumps([r["loss"] for r in rows]))  # the figures to pin, when a change is intended
    assert [r["loss"] for r in rows] == pytest.approx(PINNED_QWEN2_MOE, rel=1e-4, abs=1e-6)
    assert all(0 < r["moe_dropped"] < 0.5 for r in rows)  # capacity 1.0: uneven routing drops


def test_first_losses_are_pinned_and_moe_metrics_logged(moe_run):
    rows = [r for r in read_metrics(moe_run / "metrics.jsonl") if "loss" in r]
    losses = [r["loss"] for r in rows]
    print(json.dumps(losses))  # the figures to pin, when a change is intended
    assert losses == pytest.approx(PINNED_LOSSES, rel=1e-4, abs=1e-6)
    for r in rows:
        assert r["moe_dropped"] == 0.0  # no capacity: nothing is dropped
        assert r["moe_min_share"] <= 0.25 <= r["moe_max_share"]  # 4 experts: 1/4 is the mean
        assert 2.0 <= r["moe_lb"] < 8.0  # top-2: 2 when perfectly even, 8 on one expert
        assert r["moe_z"] > 0
        shares = [r[f"moe_share_{i}"] for i in range(4)]  # the utilisation histogram
        assert sum(shares) == pytest.approx(1.0)
        # means over layers: the least used expert on average is used at least the mean minimum
        assert r["moe_min_share"] <= min(shares) <= max(shares) <= r["moe_max_share"]


def test_saved_moe_model_loads_and_generates(moe_run):
    model, tok = load(moe_run / "model")
    assert model.cfg.arch == "mixtral" and isinstance(model.layers[0].mlp, MoE)
    assert tok.encode("hello") == tok.encode("hello")
    cli = [sys.executable, "-m", "lmforge", "generate", str(moe_run / "model"), "--prompt", "Once"]
    cli += ["--max-new-tokens", "5", "--temperature", "0", "--device", "cpu"]
    res = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("Once")


def test_structured_pruning_refuses_a_mixture_of_experts(moe_run, micro_prepared, tmp_path):
    from lmforge.compress import prune
    from lmforge.config import ConfigError, PruneConfig

    _, run_dir = micro_prepared
    cfg = PruneConfig(method="structured", device="cpu")
    with pytest.raises(ConfigError, match="is a mixture of experts"):
        prune.run(cfg, moe_run / "model", run_dir / "data", tmp_path)


def test_gguf_export_writes_llama_cpps_mixtral_layout_and_imports_back(moe_run, tmp_path):
    """f32 GGUF: the experts stacked under the names gguf's own HF -> GGUF table gives (the one
    llama.cpp's converter uses), expert counts in the metadata; `lmforge import` of the file
    gives our logits back."""
    gguf = pytest.importorskip("gguf")
    import torch

    from lmforge.compress.gguf import export_gguf
    from lmforge.model.checkpoint import load_model
    from lmforge.model.gguf_import import import_gguf

    model = load_model(moe_run / "model")
    path = export_gguf(moe_run / "model", tmp_path / "m.gguf")
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.expert_count"].contents() == 4
    assert reader.fields["llama.expert_used_count"].contents() == 2
    tensors = {t.name: t for t in reader.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.cfg.n_layer)
    moe = model.layers[1].mlp
    gate, up = moe.w13.detach().chunk(2, dim=1)
    hf = "model.layers.1.block_sparse_moe."
    for theirs, ours in [
        (hf + "gate.weight", moe.router.weight.detach()),
        (hf + "experts.w1.weight", gate),
        (hf + "experts.w3.weight", up),
        (hf + "experts.w2.weight", moe.w2.detach()),
    ]:
        t = tensors[names.get_name(theirs, try_suffixes=(".weight",))]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours.shape)
        assert torch.equal(torch.from_numpy(got.copy()), ours), theirs
    back = load_model(import_gguf(path, tmp_path / "imported"))
    assert back.cfg.arch == "mixtral" and back.cfg.n_experts == 4
    x = torch.randint(0, model.cfg.vocab_size, (2, 16))  # made-up token ids
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=1e-5, atol=1e-5)


def test_qwen2_moe_gguf_opens_in_transformers_and_imports_back_with_our_logits(moe_run, tmp_path):
    """transformers' GGUF loader reads qwen2moe files (llama.cpp's layout) and is the reference.
    It takes the experts' widths from Qwen2MoeConfig's defaults (1408, 5632), not from the
    file, so the test model has those; norm_topk false, as llama.cpp's qwen2moe computes."""
    pytest.importorskip("gguf")
    import torch
    from transformers import AutoModelForCausalLM

    from lmforge.compress.gguf import export_gguf
    from lmforge.config import ConfigError, ModelConfig
    from lmforge.model.checkpoint import load_model, save_model
    from lmforge.model.gguf_import import import_gguf
    from lmforge.model.transformer import GPT

    features = dict(arch="qwen2_moe", mlp="moe", qkv_bias=True, n_experts=4, norm_topk=False)
    features |= dict(ffn_dim=1408, shared_expert_dim=5632, tie_embeddings=False)
    cfg = ModelConfig(vocab_size=512, dim=64, n_layer=2, n_head=4, n_kv_head=2, **features)
    torch.manual_seed(0)
    ours = GPT(cfg).eval()
    with torch.no_grad():  # made-up router and shared-expert gate weights that matter
        for b in ours.layers:
            b.mlp.router.weight.normal_(0.0, 0.5)
            b.mlp.shared_gate.weight.normal_(0.0, 0.5)
    save_model(ours, tmp_path / "q", tokenizer_dir=moe_run / "model")
    path = export_gguf(tmp_path / "q", tmp_path / "q.gguf")
    theirs = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32
    )
    assert type(theirs).__name__ == "Qwen2MoeForCausalLM"
    x = torch.randint(0, 512, (2, 12))  # made-up token ids
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x), atol=1e-4, rtol=0)
    back = load_model(import_gguf(path, tmp_path / "imported"))  # and our import reads it
    assert (back.cfg.arch, back.cfg.shared_expert_dim, back.cfg.ffn_dim) == (
        "qwen2_moe",
        5632,
        1408,
    )
    with torch.no_grad():
        torch.testing.assert_close(back(x), ours(x), atol=1e-5, rtol=0)

    normalised = GPT(ModelConfig(**(cfg.__dict__ | dict(norm_topk=True))))
    save_model(normalised, tmp_path / "n", tokenizer_dir=moe_run / "model")
    with pytest.raises(ConfigError, match="norm_topk_prob true"):
        export_gguf(tmp_path / "n", tmp_path / "n.gguf")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_moe_on_two_ranks_equals_one_process(strategy, micro_recipe_path, micro_prepared, tmp_path):
    """Two optimizer steps of a micro MoE on 2 ranks (a global batch of 8) give one process's
    losses and weights. The load-balancing loss is a product of batch means, so each rank's
    differs from the global batch's: it is off here (moe_aux_coef 0); the z-loss, a plain mean
    over tokens, is on."""
    import torch
    from test_dist import ATOL, losses, pretrain, weights

    _, run_dir = micro_prepared
    moe = [f"--model.{k}={v}" for k, v in (MOE | dict(moe_aux_coef=0.0, moe_z_coef=0.01)).items()]
    one = pretrain(micro_recipe_path, run_dir, tmp_path / "one", 1, "--batch_size", "8",
                   "--max_steps", "2", *moe)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two = pretrain(micro_recipe_path, run_dir, tmp_path / "two", 2, "--batch_size", "4",
                   "--max_steps", "2", *moe, dist=["--dist.strategy", strategy])  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=ATOL, msg=k)
