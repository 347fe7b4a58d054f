"""LoRA: merged = unmerged, only adapters train, slices stay separate, and PEFT opens our adapter
directories and we open its (logits against PEFT's own forward), for Llama-style models and for
GPT-2 (one adapter over the fused c_attn, Conv1D layout)."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.config import ARCH_FEATURES, ConfigError, LoRAConfig, ModelConfig
from lmforge.infer.cpu_decode import CpuDecoder
from lmforge.io import atomic_dir
from lmforge.model.checkpoint import load_model, save_model
from lmforge.model.lora import (
    LoRALinear,
    apply_lora,
    base_state_dict,
    count_trainable,
    load_adapter,
    load_adapter_weights,
    merge_lora,
    save_adapter,
)
from lmforge.model.transformer import GPT

# grouped-query attention (q, k, v slices of different sizes) and an ffn_dim unlike dim
CFG = dict(vocab_size=64, dim=32, n_layer=2, n_head=4, n_kv_head=2, ffn_dim=48, max_seq_len=32)
HF_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(ModelConfig(**{**CFG, **kw})).eval()


def _randomize_b(model, seed=1):
    """B starts at zero, which would hide every bug in the adapter path."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                for b in m.lora_B.values():
                    b.copy_(torch.randn(b.shape, generator=gen) * 0.5)


def _ids(seed=2, T=12):
    return torch.randint(
        0, CFG["vocab_size"], (2, T), generator=torch.Generator().manual_seed(seed)
    )


def _assert_a_step_trains_only_adapters(model, before: dict) -> None:
    """One AdamW step over every parameter (frozen ones included, with weight decay): each
    adapter tensor changes, every other tensor stays bit for bit what it was in `before`."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x = _ids(T=17)
    logits = model(x[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
    opt.step()
    after = model.state_dict()
    for k, v in before.items():
        if ".lora_" in k:
            assert not torch.equal(after[k], v), f"adapter {k} did not train"
        else:
            assert torch.equal(after[k], v), f"frozen {k} changed"


def _peft_model_with_random_b(peft, hf, lora, out_dir):
    """PEFT's own adapted model with non-zero B (so the adapter changes the logits), saved to
    out_dir with PEFT's save_pretrained."""
    theirs = peft.get_peft_model(hf, lora).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    theirs.save_pretrained(out_dir)
    return theirs


def _max_diff(a, b):
    return (a - b).abs().max().item()


def test_adapters_start_at_the_base_model_and_merge_exactly():
    model = _model()
    x = _ids()
    with torch.no_grad():
        base_logits = model(x)
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig(r=4, alpha=8.0), seed=0)
    with torch.no_grad():
        assert torch.equal(model(x), base_logits)  # B = 0: exactly the base model
    _randomize_b(model)
    sd = base_state_dict(model)
    assert sd.keys() == base_sd.keys() and all(torch.equal(sd[k], base_sd[k]) for k in sd)
    with torch.no_grad():
        adapted = model(x)
        assert _max_diff(adapted, base_logits) > 1e-2  # the adapters matter, so the test can fail
        merged = merge_lora(model)(x)
    # fp32, B @ A folded into W versus applied beside it: equal to rounding
    assert _max_diff(merged, adapted) <= 1e-5
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert model.state_dict().keys() == base_sd.keys()


def test_one_adamw_step_changes_only_adapters():
    model = _model().train()
    apply_lora(model, LoRAConfig(r=4, alpha=8.0, dropout=0.1), seed=0)
    _randomize_b(model)  # with B = 0 the first step would leave every A unchanged
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _assert_a_step_trains_only_adapters(model, before)
    # 2 layers x (A: r x dim for q k v o gate up, r x ffn for down; B: r x each output)
    r, dim, ffn, q, kv = 4, 32, 48, 32, 16
    adapters = 2 * r * (6 * dim + ffn + (q + 2 * kv) + dim + 2 * ffn + dim)
    total = sum(v.numel() for k, v in before.items() if k != "lm_head.weight")  # tied
    assert count_trainable(model) == (adapters, total)


def test_targets_touch_only_their_slices():
    model = _model()
    apply_lora(model, LoRAConfig(r=4, targets=["q", "v"]), seed=0)
    _randomize_b(model)
    wqkv = model.layers[0].attn.wqkv
    assert isinstance(wqkv, LoRALinear) and set(wqkv.lora_A) == {"q", "v"}
    for name in ("attn.wo", "mlp.w13", "mlp.w2"):  # untargeted layers stay plain
        assert type(model.layers[0].get_submodule(name)) is torch.nn.Linear
    x = torch.randn(3, 32)
    with torch.no_grad():
        y, y0 = wqkv(x), wqkv.base(x)
        q, k, v = y.split([32, 16, 16], dim=-1)
        q0, k0, v0 = y0.split([32, 16, 16], dim=-1)
    assert torch.equal(k, k0)
    assert _max_diff(q, q0) > 1e-2 and _max_diff(v, v0) > 1e-2
    assert _max_diff(x @ wqkv.weight.T, y) < 1e-5  # `.weight` is the adapted weight


def test_cpu_decoder_sees_the_adapters():
    # generate() decodes a GPT on a CPU through CpuDecoder, which reads `.weight` directly
    model = _model()
    apply_lora(model, LoRAConfig(r=4), seed=0)
    _randomize_b(model)
    ids = _ids()[0]
    with torch.no_grad():
        ref = model(ids.view(1, -1))[0, -1]
        cache = model.new_cache(1)
        decoder = CpuDecoder(model)
        decoder.prefill(ids[:-1], cache)
        got = decoder.step(ids[-1:], cache, len(ids) - 1)
    assert _max_diff(got, ref) < 1e-5


def test_apply_refuses_unsupported_models_and_r0_is_a_no_op():
    model = _model()
    assert apply_lora(model, LoRAConfig(r=0)) is model
    assert count_trainable(model)[0] == count_trainable(model)[1]
    apply_lora(model, LoRAConfig(r=2))
    with pytest.raises(ConfigError, match="already has LoRA"):
        apply_lora(model, LoRAConfig(r=2))
    other = _model()
    other.cfg.arch = "bert"  # a family without a PEFT naming table
    with pytest.raises(ConfigError, match="not supported for model arch 'bert'"):
        apply_lora(other, LoRAConfig(r=2))


def _save_adapter(model, path):
    save_adapter(model, path, base_model_path="runs/x/model")


def test_our_round_trip_is_exact(tmp_path):
    model = _model()
    apply_lora(model, LoRAConfig(r=4, alpha=12.0, dropout=0.05, targets=["k", "o", "up"]), seed=0)
    _randomize_b(model)
    _save_adapter(model, tmp_path / "a")
    conf = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert conf["target_modules"] == ["k_proj", "o_proj", "up_proj"] and conf["lora_alpha"] == 12
    loaded = load_adapter(_model(), tmp_path / "a")
    x = _ids()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.layers[1].mlp.w13.dropout_p == 0.05


# --------------------------------------------------------------------------- PEFT interop


@pytest.fixture(scope="module")
def peft_env():
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    return peft, transformers


def test_peft_opens_our_adapter(tmp_path, peft_env):
    peft, transformers = peft_env
    model = _model()
    with atomic_dir(tmp_path / "m") as tmp:
        save_model(model, tmp)
    apply_lora(model, LoRAConfig(r=4, alpha=8.0), seed=0)
    _randomize_b(model)
    save_adapter(model, tmp_path / "a", base_model_path=str(tmp_path / "m"))
    x = _ids()
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "m")
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "a").eval()
    with torch.no_grad():
        ours, ref = model(x), theirs(x).logits
        with theirs.disable_adapter():
            assert _max_diff(ref, theirs(x).logits) > 1e-2  # the adapter matters
    assert _max_diff(ours, ref) <= 1e-4  # fp32; separate q/k/v matmuls in another order
    # PEFT saving the adapter it loaded writes our tensor names and values exactly
    theirs.save_pretrained(tmp_path / "again")
    mine, again = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("a", "again"))
    assert mine.keys() == again.keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in mine
    assert all(torch.equal(mine[k], again[k]) for k in mine)


def test_we_open_a_peft_adapter(tmp_path, peft_env):
    peft, transformers = peft_env
    with atomic_dir(tmp_path / "m") as tmp:
        save_model(_model(), tmp)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "m")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=HF_NAMES, task_type="CAUSAL_LM")
    theirs = _peft_model_with_random_b(peft, hf, lora, tmp_path / "a")
    model = load_adapter(load_model(tmp_path / "m"), tmp_path / "a")
    x = _ids()
    with torch.no_grad():
        ref = theirs(x).logits
        with theirs.disable_adapter():
            assert _max_diff(ref, theirs(x).logits) > 1e-2  # the adapter matters
        assert _max_diff(model(x), ref) <= 1e-4


# --------------------------------------------------------------------------- damaged directories


@pytest.fixture
def adapter_dir(tmp_path):
    model = _model()
    apply_lora(model, LoRAConfig(r=4, targets=["q", "down"]), seed=0)
    _save_adapter(model, tmp_path / "a")
    return tmp_path / "a"


def _edit_config(path, **changes):
    f = path / "adapter_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))


def _load_fails(path, match):
    model = _model()
    with pytest.raises(ConfigError, match=match):
        load_adapter(model, path)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # untouched


def test_missing_and_truncated_files_are_named(adapter_dir):
    f = adapter_dir / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    _load_fails(adapter_dir, r"adapter_model\.safetensors is corrupt or truncated")
    f.unlink()
    _load_fails(adapter_dir, r"adapter weights not found: .*adapter_model\.safetensors")
    (adapter_dir / "adapter_config.json").write_text("{")
    _load_fails(adapter_dir, r"adapter_config\.json is not valid JSON")
    (adapter_dir / "adapter_config.json").unlink()
    _load_fails(adapter_dir, r"adapter config not found: .*adapter_config\.json")


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"use_rslora": True}, r"adapter_config\.json: use_rslora = True: rank-stabilised"),
        ({"use_dora": True}, r"adapter_config\.json: use_dora = True"),
        ({"peft_type": "IA3"}, r"adapter_config\.json: peft_type = 'IA3'"),
        ({"init_lora_weights": "pissa"}, r"init_lora_weights = 'pissa'"),
        ({"target_modules": ["q_proj", "c_attn"]}, r"target_modules .* cannot adapt 'c_attn'"),
        ({"fan_in_fan_out": True}, r"fan_in_fan_out = True: expected false for a llama model"),
    ],
)
def test_unsupported_options_name_key_and_file(adapter_dir, changes, match):
    _edit_config(adapter_dir, **changes)
    _load_fails(adapter_dir, match)


def test_bad_tensors_are_named(adapter_dir):
    f = adapter_dir / "adapter_model.safetensors"
    good = load_file(f)
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
    save_file({**good, key: torch.zeros(4, 32)}, f)  # down's input is ffn_dim = 48
    _load_fails(adapter_dir, r"layers\.1\.mlp\.down_proj\.lora_A\.weight has shape \(4, 32\)")
    save_file({**good, "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 32)}, f)
    _load_fails(adapter_dir, r"'base_model\.model\.lm_head\.lora_A\.weight' is not a LoRA weight")
    save_file({k: v for k, v in good.items() if k != key}, f)
    _load_fails(adapter_dir, r"down_proj\.lora_A\.weight is missing")


def test_save_without_adapters_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="no LoRA adapters"):
        save_adapter(_model(), tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_merged_model_saves_and_reloads(tmp_path):
    model = _model()
    apply_lora(model, LoRAConfig(r=2), seed=0)
    _randomize_b(model)
    x = _ids()
    with torch.no_grad():
        adapted = model(x)
    merged = merge_lora(copy.deepcopy(model))
    with atomic_dir(tmp_path / "m") as tmp:
        save_model(merged, tmp)
    with torch.no_grad():
        assert _max_diff(load_model(tmp_path / "m")(x), adapted) <= 1e-5


# --------------------------------------------------------------------------- GPT-2

GPT2_CFG = dict(CFG, n_kv_head=4, arch="gpt2", **ARCH_FEATURES["gpt2"])
GPT2_TARGETS = ["q", "k", "v", "o", "up", "down"]  # no gate: GPT-2's MLP is c_fc -> GELU -> c_proj


def _gpt2(seed=0):
    return _model(seed, **GPT2_CFG)


def test_gpt2_has_one_qkv_adapter_and_merges_exactly():
    model = _gpt2()
    x = _ids()
    with torch.no_grad():
        base_logits = model(x)
    apply_lora(model, LoRAConfig(r=4, alpha=8.0, targets=GPT2_TARGETS), seed=0)
    layer = model.layers[0]
    assert set(layer.attn.wqkv.lora_A) == {"qkv"}  # PEFT's c_attn: one adapter, all 96 rows
    assert layer.attn.wqkv.lora_A["qkv"].shape == (4, 32)
    assert layer.attn.wqkv.lora_B["qkv"].shape == (96, 4)
    assert all(isinstance(m, LoRALinear) for m in (layer.attn.wo, layer.mlp.w1, layer.mlp.w2))
    _randomize_b(model)
    with torch.no_grad():
        adapted = model(x)
        assert _max_diff(adapted, base_logits) > 1e-2
        merged = merge_lora(model)(x)
    assert _max_diff(merged, adapted) <= 1e-5
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_gpt2_one_adamw_step_changes_only_adapters():
    model = _gpt2().train()
    apply_lora(model, LoRAConfig(r=4, alpha=8.0, dropout=0.1, targets=GPT2_TARGETS), seed=0)
    _randomize_b(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _assert_a_step_trains_only_adapters(model, before)
    # 2 layers x r x (in + out) of c_attn (32 -> 96), attn.c_proj (32 -> 32), c_fc (32 -> 48),
    # mlp.c_proj (48 -> 32)
    adapters = 2 * 4 * ((32 + 96) + (32 + 32) + (32 + 48) + (48 + 32))
    assert count_trainable(model)[0] == adapters


@pytest.mark.parametrize(
    "targets, match",
    [
        (["q", "gate"], r"a gpt2 model has no 'gate' projection; choose from q, k, v, o, up, down"),
        (["q", "o"], r"gpt2 fuses q/k/v into one c_attn adapter in PEFT, so name q, k, v together"),
    ],
)
def test_gpt2_targets_it_cannot_adapt_are_errors(targets, match):
    model = _gpt2()
    with pytest.raises(ConfigError, match=match):
        apply_lora(model, LoRAConfig(r=4, targets=targets))
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


@pytest.fixture
def gpt2_dir(tmp_path, peft_env):
    """A tiny GPT2LMHeadModel saved by transformers, with biases and norms made to matter."""
    _, transformers = peft_env
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_inner=48,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    hf = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


@pytest.mark.parametrize(
    "targets, modules",
    [
        (GPT2_TARGETS, ["c_attn", "c_proj", "c_fc"]),
        (["q", "k", "v", "down"], ["c_attn", "mlp.c_proj"]),  # `c_proj` would adapt attn's too
    ],
)
def test_peft_opens_our_gpt2_adapter(tmp_path, peft_env, gpt2_dir, targets, modules):
    peft, transformers = peft_env
    model = load_model(gpt2_dir)
    apply_lora(model, LoRAConfig(r=4, alpha=8.0, targets=targets), seed=0)
    _randomize_b(model)
    save_adapter(model, tmp_path / "a", base_model_path=str(gpt2_dir))
    conf = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert conf["target_modules"] == modules and conf["fan_in_fan_out"] is True
    hf = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir)
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "a").eval()
    x = _ids()
    with torch.no_grad():
        ours, ref = model(x), theirs(x).logits
        with theirs.disable_adapter():
            assert _max_diff(ref, theirs(x).logits) > 1e-2
    assert _max_diff(ours, ref) <= 1e-4
    theirs.save_pretrained(tmp_path / "again")  # PEFT adapted exactly our modules, same names
    mine, again = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("a", "again"))
    assert mine.keys() == again.keys()
    assert all(torch.equal(mine[k], again[k]) for k in mine)
    assert mine["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"].shape == (96, 4)


def test_we_open_a_peft_gpt2_adapter(tmp_path, peft_env, gpt2_dir):
    peft, transformers = peft_env
    hf = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir)
    lora = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,
        task_type="CAUSAL_LM",
    )
    theirs = _peft_model_with_random_b(peft, hf, lora, tmp_path / "a")
    model = load_adapter(load_model(gpt2_dir), tmp_path / "a")
    x = _ids()
    with torch.no_grad():
        ref = theirs(x).logits
        with theirs.disable_adapter():
            assert _max_diff(ref, theirs(x).logits) > 1e-2
        assert _max_diff(model(x), ref) <= 1e-4
        # resuming: the same adapter copied into a model that apply_lora prepared
        resumed = apply_lora(load_model(gpt2_dir), LoRAConfig(r=4, alpha=8.0, targets=GPT2_TARGETS))
        assert torch.equal(load_adapter_weights(resumed, tmp_path / "a")(x), model(x))
    _edit_config(tmp_path / "a", fan_in_fan_out=False)  # PEFT writes true for Conv1D modules
    with pytest.raises(ConfigError, match="fan_in_fan_out = False: expected true for a gpt2"):
        load_adapter(load_model(gpt2_dir), tmp_path / "a")


def test_default_targets_mean_every_projection_the_family_has():
    model = apply_lora(_gpt2(), LoRAConfig(r=4))  # the default lists all seven, gate included
    explicit = apply_lora(_gpt2(), LoRAConfig(r=4, targets=GPT2_TARGETS))
    assert count_trainable(model) == count_trainable(explicit)
