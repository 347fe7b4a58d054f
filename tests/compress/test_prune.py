"""Pruning: exact magnitude and 2:4 patterns that survive recovery, structured pruning that
equals zeroing the removed heads and channels and opens in transformers, the importance score
against a direct computation, bad input, and the command line."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import transformers

from lmforge.compress import prune
from lmforge.compress.prune import (
    apply_masks,
    block_linears,
    cut,
    importance,
    keep_plan,
    magnitude_mask,
    two_four_mask,
    weight_masks,
)
from lmforge.config import ARCH_FEATURES, ConfigError, ModelConfig, PruneConfig
from lmforge.model.checkpoint import load_model, save_model
from lmforge.model.transformer import GPT, num_params

LOOP = dict(batch_size=4, seq_len=32, eval_tokens=1024, log_every=1, device="cpu")
LOOP_NO_EVAL = dict(batch_size=4, seq_len=32, log_every=1, device="cpu")


def _model(arch="llama", **kw) -> GPT:
    cfg = dict(vocab_size=128, dim=64, n_layer=2, n_head=4, max_seq_len=64, ffn_dim=96)
    torch.manual_seed(0)
    model = GPT(ModelConfig(**(cfg | kw), arch=arch, **ARCH_FEATURES[arch])).eval()
    with torch.no_grad():  # nonzero biases and norms, so slicing them wrongly would show
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


# --------------------------------------------------------------------------- masks


def test_magnitude_mask_zeroes_exactly_the_smallest():
    torch.manual_seed(0)
    w = torch.randn(48, 40)
    for sparsity in (0.0, 0.3, 0.5, 0.9):
        keep = magnitude_mask(w, sparsity)
        assert int((~keep).sum()) == round(sparsity * w.numel())
        if 0 < sparsity:
            assert w[~keep].abs().max() <= w[keep].abs().min()


def test_two_four_mask_keeps_the_two_largest_of_every_four():
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    keep = two_four_mask(w)
    groups, kept = w.abs().view(16, 8, 4), keep.view(16, 8, 4)
    assert (kept.sum(-1) == 2).all()
    smallest_kept = torch.where(kept, groups, torch.inf).amin(-1)
    largest_dropped = torch.where(kept, -torch.inf, groups).amax(-1)
    assert (largest_dropped <= smallest_kept).all()


@pytest.mark.parametrize("method", ["magnitude", "2:4"])
def test_masks_survive_recovery(micro_prepared, micro_pretrained, tmp_path, method):
    _, run_dir = micro_prepared
    _, model_dir = micro_pretrained
    cfg = PruneConfig(method=method, sparsity=0.6, max_steps=3, warmup_steps=1, lr=1e-2, **LOOP)
    s = prune.run(cfg, model_dir, run_dir / "data", tmp_path)
    out = tmp_path / ("2of4" if method == "2:4" else "magnitude")
    assert s["step"] == 3 and not s["interrupted"] and (out / "summary.json").exists()
    base, after = load_model(model_dir), load_model(out / "model")
    masks = weight_masks(base, cfg)  # what the driver pruned: the masks of the original weights
    names = set(block_linears(after))
    assert {n.removesuffix(".weight") for n in masks} == names and len(names) == 8
    for name, keep in masks.items():
        w, w0 = after.get_parameter(name), base.get_parameter(name)
        assert (w[~keep] == 0).all()  # pruned weights stayed exactly zero through 3 steps
        assert (w[keep] != 0).all() and not torch.equal(w[keep], w0[keep])  # the rest trained
        if method == "2:4":
            assert ((w.view(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all()
        else:
            assert int((w == 0).sum()) == round(0.6 * w.numel())
    assert (after.tok_emb.weight != 0).all()  # embeddings are not pruned
    want = 0.5 if method == "2:4" else 0.6
    assert s["sparsity"] == pytest.approx(want, abs=1e-3)
    assert s["params_after"] == s["params_before"] > s["nonzero_after"]
    assert (
        set(s["val_recovered"]) == {"en", "zh"} and "before -> pruned -> recovered" in s["headline"]
    )


def test_two_four_needs_inputs_in_fours():
    model = _model(dim=30, n_head=1)
    with pytest.raises(ConfigError, match="groups of 4.*has 30"):
        weight_masks(model, PruneConfig(method="2:4"))


# --------------------------------------------------------------------------- structured


def _zeroed(model: GPT, plan: dict) -> GPT:
    """The original model with the removed heads' wo columns and channels' w2 columns zeroed:
    what they add to the residual stream is gone, so it must compute what the cut model does."""
    out = GPT(model.cfg).eval()
    out.load_state_dict(model.state_dict())
    D = model.cfg.head_dim
    with torch.no_grad():
        for i, block in enumerate(out.layers):
            gone = sorted(set(range(model.cfg.n_head)) - set(plan["q"][i].tolist()))
            for h in gone:
                block.attn.wo.weight[:, h * D : (h + 1) * D] = 0
            gone = sorted(set(range(model.cfg.ffn_dim)) - set(plan["ffn"][i].tolist()))
            block.mlp.w2.weight[:, gone] = 0
    return out


CASES = {  # name: model, heads, ffn
    "llama-gqa": (dict(arch="llama", n_kv_head=2), 0.5, 0.25),
    "llama-mha": (dict(arch="llama", n_head=8, dim=64), 0.5, 0.5),
    "mistral-mha-3-of-4-heads": (dict(arch="mistral"), 0.25, 0.5),
    "qwen2-qkv-bias": (dict(arch="qwen2", n_kv_head=2, tie_embeddings=False), 0.5, 0.25),
    "gpt2-ffn-only": (dict(arch="gpt2"), 0.0, 0.25),
}


@pytest.mark.parametrize("name", CASES)
def test_structured_equals_zeroing_and_opens_in_transformers(name, tmp_path):
    kw, heads, ffn = CASES[name]
    model = _model(**kw)
    x = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    head_scores, channel_scores = importance(model, [x])
    plan = keep_plan(
        model, PruneConfig(method="structured", heads=heads, ffn=ffn), head_scores, channel_scores
    )
    pruned = cut(model, plan)
    c = pruned.cfg
    n_head = model.cfg.n_head
    assert c.n_head == n_head - round(n_head * heads) and c.ffn_dim == 96 - round(96 * ffn)
    assert c.n_head // c.n_kv_head == model.cfg.n_head // model.cfg.n_kv_head  # GQA ratio kept
    assert c.head_dim == model.cfg.head_dim and num_params(pruned) < num_params(model)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), _zeroed(model, plan)(x), rtol=1e-5, atol=1e-5)
    save_model(pruned, tmp_path)
    ours = load_model(tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(ours(x), pruned(x))
        torch.testing.assert_close(theirs(x).logits, ours(x), rtol=1e-4, atol=1e-4)


def test_structured_with_nothing_removed_is_the_same_model():
    model = _model(n_kv_head=2)
    x = torch.randint(0, 128, (2, 16))
    plan = keep_plan(
        model, PruneConfig(method="structured", heads=0, ffn=0), *importance(model, [x])
    )
    same = cut(model, plan)
    assert same.cfg == model.cfg
    with torch.no_grad():
        assert torch.equal(same(x), model(x))


def test_importance_is_the_norm_each_unit_adds_to_the_stream():
    model = _model(n_layer=1)
    x = torch.randint(0, 128, (3, 20))
    seen = {}
    model.layers[0].attn.wo.register_forward_pre_hook(lambda m, a: seen.update(attn=a[0]))
    model.layers[0].mlp.w2.register_forward_pre_hook(lambda m, a: seen.update(mlp=a[0]))
    heads, channels = importance(model, [x])
    with torch.no_grad():
        model(x)
    wo, w2 = model.layers[0].attn.wo.weight, model.layers[0].mlp.w2.weight
    y = seen["attn"].reshape(60, 4, 16)
    direct = torch.stack(
        [(y[:, h] @ wo[:, h * 16 : (h + 1) * 16].T).norm(dim=-1).mean() for h in range(4)]
    )
    torch.testing.assert_close(heads[0].float(), direct, rtol=1e-4, atol=1e-6)
    a = seen["mlp"].reshape(60, 96)
    direct = torch.stack([(a[:, j : j + 1] * w2[:, j]).norm(dim=-1).mean() for j in range(96)])
    torch.testing.assert_close(channels[0].float(), direct, rtol=1e-4, atol=1e-6)


def test_structured_run_is_smaller_and_recovers(micro_prepared, micro_pretrained, tmp_path):
    _, run_dir = micro_prepared
    _, model_dir = micro_pretrained
    cfg = PruneConfig(method="structured", heads=0.5, ffn=0.5, calib_samples=8, max_steps=2, **LOOP)
    s = prune.run(cfg, model_dir, run_dir / "data", tmp_path)
    assert s["params_after"] < s["params_before"] and s["nonzero_after"] <= s["params_after"]
    assert s["shape"] == {"n_head": [2, 1], "n_kv_head": [2, 1], "ffn_dim": [128, 64]}
    assert s["forward_ms_per_token"]["after"] > 0 and s["val_recovered"]
    model = load_model(tmp_path / "structured" / "model")
    assert num_params(model) == s["params_after"] and model.cfg.n_head == 1
    with torch.no_grad():
        assert model(torch.randint(0, 512, (1, 8))).isfinite().all()


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_a_config_error(micro_prepared, micro_pretrained, tmp_path):
    _, run_dir = micro_prepared
    _, model_dir = micro_pretrained
    data = run_dir / "data"
    with pytest.raises(ConfigError, match="not a model directory"):
        prune.run(PruneConfig(**LOOP), tmp_path, data, tmp_path / "o")
    quantized = tmp_path / "quantized"
    shutil.copytree(model_dir, quantized)
    hf = json.loads((quantized / "config.json").read_text())
    hf["quantization_config"] = {"quant_method": "lmforge", "bits": 8}
    (quantized / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match=r"is a quantized \(\w+\) checkpoint"):
        prune.run(PruneConfig(**LOOP), quantized, data, tmp_path / "o")
    structured = dict(method="structured", calib_samples=4, **LOOP)
    with pytest.raises(ConfigError, match="would remove all 2 heads"):
        prune.run(PruneConfig(heads=0.8, **structured), model_dir, data, tmp_path / "o")
    with pytest.raises(ConfigError, match="removes none"):
        prune.run(PruneConfig(heads=0.1, **structured), model_dir, data, tmp_path / "o")
    with pytest.raises(ConfigError, match="would remove all 128 MLP channels"):
        prune.run(PruneConfig(heads=0, ffn=0.999, **structured), model_dir, data, tmp_path / "o")
    model = _model(arch="gpt2")
    with pytest.raises(ConfigError, match=r"leaves 3 heads, which do not divide dim 64.*0.50"):
        keep_plan(
            _model(),
            PruneConfig(method="structured", heads=0.25),
            torch.ones(2, 4),
            torch.ones(2, 96),
        )
    with pytest.raises(ConfigError, match="GPT-2"):
        keep_plan(
            model, PruneConfig(method="structured", heads=0.5), torch.ones(2, 4), torch.ones(2, 96)
        )
    with pytest.raises(ConfigError, match="prune.method must be one of"):
        PruneConfig(method="random")


def test_cli_prune(micro_recipe_path, micro_prepared, micro_pretrained, tmp_path):
    _, run_dir = micro_prepared
    _, model_dir = micro_pretrained
    r = subprocess.run(
        [sys.executable, "-m", "lmforge", "prune", "--config", str(micro_recipe_path), "--out", str(tmp_path),
         "--model-dir", str(model_dir), "--data-dir", str(run_dir / "data"), "--method", "2:4",
         "--eval_tokens", "1024", "--seq_len", "32"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("prune: 2:4: ") and "nonzero" in r.stdout
    s = json.loads((tmp_path / "prune" / "2of4" / "summary.json").read_text())
    assert s["sparsity"] == 0.5 and s["val_recovered"] is None
    w = load_model(tmp_path / "prune" / "2of4" / "model").layers[0].mlp.w2.weight
    assert ((w.view(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all()


def test_apply_masks_keeps_zeros_zero():
    model = _model()
    masks = weight_masks(model, PruneConfig(method="magnitude", sparsity=0.5))
    apply_masks(model, masks)
    with torch.no_grad():
        for name in masks:
            model.get_parameter(name).add_(1.0)
    apply_masks(model, masks)
    assert all(
        int((model.get_parameter(n) == 0).sum()) == int((~m).sum()) for n, m in masks.items()
    )


def test_prune_starts_from_a_lora_adapter_merged(micro_prepared, micro_adapter, tmp_path):
    """An adapter directory is pruned as the model merged with it, and the pruned model gets
    the base's tokenizer files."""
    from lmforge.model.load import load

    _, run_dir = micro_prepared
    cfg = PruneConfig(
        method="magnitude", sparsity=0.5, max_steps=0, eval_tokens=512, **LOOP_NO_EVAL
    )
    s = prune.run(cfg, micro_adapter, run_dir / "data", tmp_path)
    assert s["step"] == 0 and (tmp_path / "magnitude" / "model" / "tokenizer.json").exists()
    merged, _ = load(micro_adapter)
    pruned, _ = load(tmp_path / "magnitude" / "model")
    w, p = merged.layers[0].attn.wqkv.weight, pruned.layers[0].attn.wqkv.weight
    kept = p != 0
    assert 0.4 < kept.float().mean() < 0.6 and torch.equal(p[kept], w[kept])
