"""Weight-only quantization: the numbers, the packed layout, the kernels against dequantised
weights, GPTQ against round-to-nearest, quantized checkpoints through every loader, bad input."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from lmforge.compress.gptq import Hessian, gptq_quantize
from lmforge.compress.quantize import quantize_model
from lmforge.compress.quantize import run as quantize_run
from lmforge.config import ConfigError, ModelConfig, QuantizeConfig
from lmforge.infer.cpu_decode import CpuDecoder
from lmforge.model import kernels
from lmforge.model.checkpoint import load_model, save_model, save_quantized
from lmforge.model.load import load
from lmforge.model.quant import (
    QuantLinear,
    dequantize_int4,
    int4_params,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)
from lmforge.model.transformer import GPT

REPO = Path(__file__).resolve().parents[2]


def test_int8_error_is_at_most_half_a_step_per_row():
    torch.manual_seed(0)
    w = torch.randn(64, 96) * torch.rand(64, 1) * 3  # rows of different ranges
    w[5] = 0.0  # an all-zero row stays exactly zero
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-6).all()
    assert err[5].max() == 0
    # the largest weight of each row is exact up to float rounding
    assert torch.allclose((q.float() * scale[:, None]).abs().amax(1), w.abs().amax(1), rtol=1e-6)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_error_is_at_most_half_a_step_per_group(group):
    torch.manual_seed(1)
    w = torch.randn(16, 256) + 0.5  # off-centre: the zero point matters
    w[3] = 0.0  # an all-zero row stays exactly zero
    scale, zero = int4_params(w, group)
    q = quantize_int4(w, scale, zero, group)
    assert q.max() <= 15 and scale.half().float().equal(scale)  # float16-exact scales
    assert zero.half().float().equal(zero)  # and zero points
    deq = dequantize_int4(pack_int4(q), scale, zero, group)
    step = scale.repeat_interleave(group, dim=1)
    err = (deq - w).abs()
    # the grid spans each group's [min, max]: at most half a step (plus the float16 rounding
    # of the scale and zero point, which can move the ends by a little)
    assert (err <= step * 0.51 + 1e-5).all()
    assert deq[3].abs().max() == 0
    # each group's minimum is on the grid (q = 0), up to the zero point's float16 rounding
    lo = w.view(16, -1, group).amin(2)
    assert torch.allclose(deq.view(16, -1, group).amin(2), lo, atol=1e-3)


def test_int4_recovers_weights_already_on_a_q4_1_grid():
    """Weights dequantized from llama.cpp's Q4_1 (blocks of 32: float16 scale d and minimum m,
    w = m + d * q) sit on a grid with a float minimum: int4 in groups of 32 finds it again (an
    integer zero point could not: it forces 0 onto the grid, off Q4_1's by up to half a step)."""
    g = torch.Generator().manual_seed(4)
    N, K = 8, 256
    d = (torch.rand(N, K // 32, 1, generator=g) * 0.01 + 0.001).half().float()
    m = (-torch.rand(N, K // 32, 1, generator=g) * 0.1).half().float()
    q = torch.randint(0, 16, (N, K // 32, 32), generator=g)
    q[:, :, 0], q[:, :, 1] = 0, 15  # every block spans its full range, as Q4_1 makes it
    w = (m + d * q).view(N, K)
    scale, zero = int4_params(w, 32)
    deq = dequantize_int4(pack_int4(quantize_int4(w, scale, zero, 32)), scale, zero, 32)
    assert quantize_int4(w, scale, zero, 32).equal(q.view(N, K).to(torch.uint8))
    assert (deq - w).abs().max() <= m.abs().max() * 2**-10  # the zero point's float16 rounding


def test_int4_packing_round_trips_in_the_documented_nibble_order():
    torch.manual_seed(2)
    q = torch.randint(0, 16, (5, 128), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (5, 64) and packed.dtype == torch.uint8
    assert unpack_int4(packed).equal(q)
    # byte i of a 32-value block: value i in the low nibble, value i + 16 in the high one
    assert packed[0, 3] == q[0, 3] | (q[0, 19] << 4)
    assert packed[0, 16 + 3] == q[0, 32 + 3] | (q[0, 32 + 19] << 4)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 3, 8, 20])  # <= 8 rows: the kernels; 20: dequantise
@pytest.mark.parametrize("bias", [False, True])
def test_quant_linear_equals_dequantised_weights_times_input(bits, rows, bias):
    torch.manual_seed(3)
    lin = nn.Linear(128, 72, bias=bias)
    with torch.no_grad():
        if bias:
            lin.bias.normal_()
    ql = QuantLinear.from_float(lin, bits, 64)
    x = torch.randn(rows, 128)
    ref = F.linear(x, ql.dequantize(), lin.bias)
    assert torch.allclose(ql(x), ref, atol=1e-4, rtol=1e-4)
    assert ql(x.view(rows, 1, 128)).shape == (rows, 1, 72)  # leading dims are kept
    # and the quantized layer is close to the float one
    rel = (ql(x) - lin(x)).norm() / lin(x).norm()
    assert rel < (0.01 if bits == 8 else 0.12)


def test_kernels_build_here():
    """CI has a C compiler: the fast path must not silently fall back there."""
    assert kernels.available(), kernels.error()


def test_int8_outlier_features_stay_float():
    torch.manual_seed(4)
    lin = nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        lin.weight[:, 7] *= 50  # a column that would stretch every row's int8 scale
    plain = QuantLinear.from_float(lin, 8)
    kept = QuantLinear.from_float(lin, 8, outliers=torch.tensor([7]))
    x = torch.randn(4, 64)
    assert torch.allclose(kept.dequantize()[:, 7], lin.weight[:, 7])
    err_plain = (plain(x) - lin(x)).norm()
    err_kept = (kept(x) - lin(x)).norm()
    assert err_kept < 0.2 * err_plain
    assert torch.allclose(kept(x), F.linear(x, kept.dequantize()), atol=1e-4)


def test_gptq_reduces_output_error_against_round_to_nearest():
    torch.manual_seed(5)
    K, N = 256, 96
    # correlated inputs with uneven scales, as real activations are
    mix = torch.randn(K, K) / K**0.5 + torch.eye(K)
    X = (torch.randn(2048, K) * torch.linspace(0.2, 3.0, K)) @ mix
    W = torch.randn(N, K) * 0.05
    h = Hessian(K, "cpu")
    for chunk in X.split(512):
        h.add(chunk)
    assert torch.allclose(h.H, 2 * X.t() @ X / len(X), rtol=1e-3, atol=1e-3)
    s, z = int4_params(W, 64)
    rtn = dequantize_int4(pack_int4(quantize_int4(W, s, z, 64)), s, z, 64)
    errs = {"rtn": (X @ (W - rtn).t()).pow(2).mean()}
    for act_order in (False, True):
        q, s, z = gptq_quantize(W, h.H, 64, block_size=128, act_order=act_order)
        deq = dequantize_int4(pack_int4(q), s, z, 64)
        errs[act_order] = (X @ (W - deq).t()).pow(2).mean()
    assert errs[False] < 0.8 * errs["rtn"], errs
    assert errs[True] < 0.8 * errs["rtn"], errs


def _model(**kw) -> GPT:
    torch.manual_seed(6)
    cfg = dict(vocab_size=96, dim=64, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=32)
    return GPT(ModelConfig(**(cfg | kw))).eval()


@pytest.mark.parametrize("method", ["int8", "int4", "gptq"])
@pytest.mark.parametrize("tie", [True, False])
def test_quantized_model_saves_loads_and_decodes_like_its_forward(tmp_path, method, tie):
    model = _model(tie_embeddings=tie)
    ids = torch.randint(0, 96, (1, 20))
    with torch.no_grad():
        ref = model(ids)
    cfg = QuantizeConfig(method=method, group_size=32, calib_samples=4, calib_seq_len=16)
    calib = torch.randint(0, 96, (4, 16))
    spec = quantize_model(model, cfg, calib)
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in spec.modules)
    assert len(spec.modules) == 2 * 4  # wqkv, wo, w13, w2 in each block
    with torch.no_grad():
        out = model(ids)
    rel = (out - ref).norm() / ref.norm()
    assert rel < (0.02 if method == "int8" else 0.2), rel
    save_quantized(model, spec, tmp_path / "q")
    hf = json.loads((tmp_path / "q" / "config.json").read_text())
    assert hf["quantization_config"]["quant_method"] == "lmforge"
    loaded = load_model(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(ids), out)
        # batch-1 decoding (the CPU decode step, quantized kernels) against the full forward
        dec = CpuDecoder(loaded)
        cache = loaded.new_cache(1)
        logits = [dec.prefill(ids[0, :4], cache)]
        logits += [dec.step(ids[0, p : p + 1], cache, p) for p in range(4, 20)]
    assert torch.allclose(torch.stack(logits), out[0, 3:], atol=2e-4), method


def test_quantized_file_is_smaller(tmp_path):
    model = _model(vocab_size=512, dim=128)
    save_model(model, tmp_path / "f")
    size = {"f": (tmp_path / "f" / "model.safetensors").stat().st_size}
    for method in ("int8", "int4"):
        m = _model(vocab_size=512, dim=128)
        spec = quantize_model(m, QuantizeConfig(method=method, group_size=32))
        save_quantized(m, spec, tmp_path / method)
        size[method] = (tmp_path / method / "model.safetensors").stat().st_size
    assert size["int8"] < 0.3 * size["f"]
    assert size["int4"] < size["int8"]


def test_bad_input_is_refused_with_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="group_size must be one of 32, 64, 128; got 48"):
        QuantizeConfig(method="int4", group_size=48)
    model = _model(dim=96, n_head=3, n_kv_head=3)  # 96 inputs do not split into groups of 64
    with pytest.raises(ConfigError, match=r"layers\.0\.attn\.wqkv: input dimension 96 .* 64"):
        quantize_model(model, QuantizeConfig(method="int4", group_size=64))
    with pytest.raises(ConfigError, match="bits must be 8 or 4"):
        QuantLinear(32, 32, 3)


def lm(*args):
    return subprocess.run(
        [sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, cwd=REPO
    )


def test_cli_quantizes_then_generates_evaluates_and_refuses_requantizing(
    micro_prepared, micro_pretrained, tmp_path
):
    model_dir, data_dir = micro_pretrained[1], micro_prepared[1] / "data"
    common = ["--out", str(tmp_path), "--model-dir", str(model_dir), "--data-dir", str(data_dir)]
    res = lm("quantize", *common, "--method", "int4", "--group_size", "32", "--eval_tokens", "512")
    assert res.returncode == 0, res.stderr
    assert "int4-g32: en ppl" in res.stdout
    out = tmp_path / "quantize" / "int4-g32"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["file_bytes"] < summary["float_file_bytes"]
    res = lm("generate", str(out), "--prompt", "Once", "--max-new-tokens", "5", "--seed", "0")
    assert res.returncode == 0 and res.stdout.startswith("Once"), res.stderr
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a little girl who liked to play.")
    res = lm("eval", str(out), "--tasks", f"lm:{text}", "--out", str(tmp_path / "ev"))
    assert res.returncode == 0 and "perplexity" in res.stdout, res.stderr
    # quantizing the quantized model again: a clear error naming it, nothing written
    res = lm("quantize", "--out", str(tmp_path / "again"), "--model-dir", str(out))
    assert res.returncode == 2 and "is a quantized (int4) checkpoint" in res.stderr
    assert not (tmp_path / "again" / "quantize").exists()
    # a group size the model's width does not divide
    res = lm("quantize", *common, "--method", "int4", "--group_size", "64")
    assert res.returncode == 2 and "not divisible by the group size 64" in res.stderr


def test_quantize_run_reports_perplexity_before_and_after(
    micro_prepared, micro_pretrained, tmp_path
):
    model_dir, data_dir = micro_pretrained[1], micro_prepared[1] / "data"
    cfg = dataclasses.replace(QuantizeConfig(), method="gptq", group_size=32, calib_samples=8)
    cfg.calib_seq_len, cfg.eval_tokens = 32, 1024
    s = quantize_run(cfg, model_dir, data_dir, tmp_path)
    assert set(s["val_before"]) == set(s["val_after"]) == {"en", "zh"}
    for lang, after in s["val_after"].items():
        assert abs(after["loss"] - s["val_before"][lang]["loss"]) < 0.1
    assert (tmp_path / "gptq-g32" / "tokenizer.json").exists()


def test_quantize_opens_a_lora_adapter_as_its_merged_model(
    micro_prepared, micro_pretrained, micro_adapter, tmp_path
):
    """`lmforge quantize --model-dir OUT/sft/adapter` quantizes the merged model: the same
    tensors as quantizing the adapter merged and saved by hand."""
    from lmforge.tokenizer import Tokenizer

    model_dir, data_dir = micro_pretrained[1], micro_prepared[1] / "data"
    merged, _ = load(micro_adapter)
    save_model(
        merged, tmp_path / "merged", model_dir, pad_token_id=Tokenizer.load(model_dir).pad_id
    )
    cfg = dataclasses.replace(QuantizeConfig(), method="int8", eval_tokens=0, outlier_threshold=0)
    quantize_run(cfg, micro_adapter, data_dir, tmp_path / "qa")
    quantize_run(cfg, tmp_path / "merged", data_dir, tmp_path / "qb")
    a = load_file(tmp_path / "qa" / "int8" / "model.safetensors")
    b = load_file(tmp_path / "qb" / "int8" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    quantize_run(cfg, model_dir, data_dir, tmp_path / "qc")  # the base alone: other weights
    c = load_file(tmp_path / "qc" / "int8" / "model.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert (tmp_path / "qa" / "int8" / "tokenizer.json").exists()


def test_training_stages_refuse_a_quantized_checkpoint(tmp_path):
    model = _model()
    spec = quantize_model(model, QuantizeConfig(method="int8"))
    save_quantized(model, spec, tmp_path / "q")
    with pytest.raises(ConfigError, match="is a quantized \\(int8\\) checkpoint"):
        load_model(tmp_path / "q", quantized_ok=False)
    with pytest.raises(ConfigError, match="inference only"):
        load(tmp_path / "q", trainable=True)
