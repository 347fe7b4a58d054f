"""The mixture of experts (model/moe.py): dispatch against a per-token reference, capacity and
dropped tokens, the auxiliary losses against transformers', config checks, HF Mixtral interop."""

import re

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ConfigError, ModelConfig
from lmforge.model.moe import MoE, z_loss
from lmforge.model.transformer import GPT, aux_loss, aux_metrics


def moe_config(**kw) -> ModelConfig:
    base = dict(vocab_size=64, dim=32, n_layer=2, n_head=4, n_kv_head=2, ffn_dim=48)
    base.update(arch="mixtral", mlp="moe", n_experts=4, experts_per_token=2)
    return ModelConfig(**(base | kw))


def random_moe(cfg: ModelConfig, seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)  # made-up weights, large enough to route unevenly
    return moe


def naive_moe(moe: MoE, x: torch.Tensor, keep=None) -> torch.Tensor:
    """The reference: token by token, each of its top-k experts in turn (keep[t][j] False: the
    j-th choice of token t was dropped)."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = F.softmax(moe.router(x[t]).float(), dim=-1)
        top, experts = probs.topk(moe.k)
        top = top / top.sum()
        for j, e in enumerate(experts.tolist()):
            if keep is not None and not keep[t][j]:
                continue
            gate, up = (moe.w13[e] @ x[t]).chunk(2)
            out[t] += top[j] * (moe.w2[e] @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("k", [1, 2])
def test_grouped_dispatch_equals_per_token_reference(k):
    cfg = moe_config(experts_per_token=k)
    moe = random_moe(cfg)
    x = torch.randn(3, 7, cfg.dim)  # made-up activations
    with torch.no_grad():
        ours = moe(x)
        ref = naive_moe(moe, x.reshape(-1, cfg.dim)).view_as(x)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert moe.tokens_per_expert.sum() == 21 * k
    assert float(moe.aux_metrics["moe_dropped"]) == 0.0


def test_capacity_drops_over_capacity_slots_second_choices_first():
    cfg = moe_config(capacity_factor=0.5)
    moe = random_moe(cfg)
    x = torch.randn(1, 16, cfg.dim)  # made-up activations
    N, k, E = 16, 2, 4
    capacity = moe.capacity(N)
    assert capacity == 4  # ceil(0.5 * 16 * 2 / 4)
    with torch.no_grad():
        ours = moe(x)
        _, experts = F.softmax(moe.router(x[0]).float(), dim=-1).topk(k)
    # the reference's keep mask: first choices in token order, then second choices
    used = [0] * E
    keep = [[False] * k for _ in range(N)]
    for j in range(k):
        for t in range(N):
            e = int(experts[t, j])
            keep[t][j] = used[e] < capacity
            used[e] += 1
    with torch.no_grad():
        ref = naive_moe(moe, x[0], keep).unsqueeze(0)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    dropped = sum(not kept for row in keep for kept in row)
    assert dropped > 0  # the test means something: this routing overflows
    assert float(moe.aux_metrics["moe_dropped"]) == pytest.approx(dropped / (N * k))
    assert moe.tokens_per_expert.tolist() == used  # routed, before dropping


def test_load_balancing_loss_equals_transformers():
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    cfg = moe_config(n_experts=8, experts_per_token=2)
    moe = random_moe(cfg)
    x = torch.randn(2, 9, cfg.dim)  # made-up activations
    with torch.no_grad():
        moe(x)
        logits = moe.router(x.reshape(-1, cfg.dim))
    theirs = mixtral.load_balancing_loss_func((logits,), num_experts=8, top_k=2)
    torch.testing.assert_close(moe.aux_metrics["moe_lb"], theirs, rtol=1e-6, atol=1e-6)
    expected_z = (torch.logsumexp(logits, dim=-1) ** 2).mean()
    torch.testing.assert_close(moe.aux_metrics["moe_z"], expected_z)
    torch.testing.assert_close(z_loss(logits), expected_z)


def test_aux_loss_is_the_weighted_mean_over_layers_and_dense_models_have_none():
    cfg = moe_config(moe_aux_coef=0.1, moe_z_coef=0.01)
    torch.manual_seed(0)
    model = GPT(cfg)
    model(torch.randint(0, cfg.vocab_size, (2, 8)))  # made-up token ids
    layers = [b.mlp for b in model.layers]
    expected = sum(0.1 * m.aux_metrics["moe_lb"] + 0.01 * m.aux_metrics["moe_z"] for m in layers)
    torch.testing.assert_close(aux_loss(model).detach(), expected / cfg.n_layer)
    metrics = aux_metrics(model)
    shares = [f"moe_share_{i}" for i in range(4)]
    assert set(metrics) == {
        "moe_lb",
        "moe_z",
        "moe_dropped",
        "moe_min_share",
        "moe_max_share",
    } | set(shares)
    assert sum(metrics[k] for k in shares).item() == pytest.approx(1.0)  # a histogram
    assert aux_loss(model).requires_grad  # it trains the router
    dense = GPT(ModelConfig(vocab_size=64, dim=32, n_layer=1, n_head=4))
    dense(torch.zeros(1, 4, dtype=torch.long))
    assert aux_loss(dense) is None and aux_metrics(dense) == {}


def test_experts_down_projections_are_initialised_as_residual_writers():
    cfg = moe_config(n_layer=8, dim=64, ffn_dim=256, n_experts=8, init_std=0.02)
    torch.manual_seed(0)
    model = GPT(cfg)
    moe = model.layers[0].mlp
    assert moe.w2.std().item() == pytest.approx(0.02 / 4, rel=0.05)  # std / sqrt(2 * 8)
    assert moe.w13.std().item() == pytest.approx(0.02, rel=0.05)
    assert moe.router.weight.std().item() == pytest.approx(0.02, rel=0.1)


@pytest.mark.parametrize(
    "kw, message",
    [
        (
            dict(experts_per_token=5),
            "experts_per_token (5) must be between 1 and model.n_experts (4)",
        ),
        (dict(experts_per_token=0), "experts_per_token (0) must be between 1"),
        (dict(n_experts=0), "n_experts must be >= 2"),
        (dict(capacity_factor=-1.0), "capacity_factor must be >= 0"),
        (dict(mlp="swiglu"), "model.arch 'mixtral' computes with mlp: moe"),
        (dict(arch="llama", mlp="swiglu"), "model.shared_expert_dim need mlp 'moe'"),
        (dict(shared_expert_dim=64), "model.arch 'mixtral' has no shared expert"),
        (dict(norm_topk=False), "use arch 'qwen2_moe' for shared_expert_dim or norm_topk false"),
        (
            dict(arch="qwen2_moe", qkv_bias=True, shared_expert_dim=-1),
            "shared_expert_dim must be >= 0",
        ),
    ],
)
def test_bad_moe_configs_are_refused(kw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        moe_config(**kw)


# --------------------------------------------------------------------------- HF Mixtral

TOL = 1e-4  # fp32, max abs difference over all logits
MIXTRAL = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    max_position_embeddings=64,
    num_local_experts=4,
)


QWEN2_MOE = dict(MIXTRAL, moe_intermediate_size=48, shared_expert_intermediate_size=80)
QWEN2_MOE |= dict(num_experts=4, num_local_experts=None)


def hf_mixtral(seed=0, family="mixtral", **kw):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    if family == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**(MIXTRAL | kw)))
    else:
        values = {k: v for k, v in (QWEN2_MOE | kw).items() if v is not None}
        model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(**values))
    with torch.no_grad():  # made-up weights: norms and biases away from 1 and 0, routers (and
        for name, p in model.named_parameters():  # the shared expert's gate) that matter
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith(("gate.weight", "shared_expert_gate.weight")):
                p.normal_(0.0, 0.5)
    return model.eval()


def logits_of(model, x):
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out)


HF_CASES = {
    "mixtral-top2": ("mixtral", dict(num_experts_per_tok=2)),
    "mixtral-top1": ("mixtral", dict(num_experts_per_tok=1)),
    "qwen2_moe-top2-shared": ("qwen2_moe", dict(num_experts_per_tok=2)),
    "qwen2_moe-top2-normalised": ("qwen2_moe", dict(num_experts_per_tok=2, norm_topk_prob=True)),
}


@pytest.mark.parametrize("case", HF_CASES)
def test_moe_families_match_transformers_both_ways(tmp_path, case):
    transformers = pytest.importorskip("transformers")
    from lmforge.model.checkpoint import load_model, save_model

    family, kw = HF_CASES[case]
    theirs = hf_mixtral(family=family, **kw)
    theirs.save_pretrained(tmp_path / "hf")  # transformers 5 writes one matrix per expert
    ours = load_model(tmp_path / "hf")
    assert (ours.cfg.arch, ours.cfg.n_experts) == (family, 4)
    assert ours.cfg.experts_per_token == kw["num_experts_per_tok"]
    assert ours.cfg.shared_expert_dim == (80 if family == "qwen2_moe" else 0)
    x = torch.randint(0, 128, (2, 24))  # made-up token ids
    ref = logits_of(theirs, x)
    assert (logits_of(ours, x) - ref).abs().max().item() <= TOL

    # KV cache: a prefill, then one token at a time = the full forward
    with torch.no_grad():
        cache = ours.new_cache(2)
        parts = [ours(x[:, :9], cache, 0)] + [ours(x[:, p : p + 1], cache, p) for p in range(9, 24)]
    assert (torch.cat(parts, 1) - ref).abs().max().item() <= TOL

    save_model(ours, tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(back) is type(theirs)
    assert (logits_of(back, x) - ref).abs().max().item() <= TOL
    again = load_model(tmp_path / "ours")  # and our own reload is exact
    for (k, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_our_mixtral_opens_in_transformers_with_equal_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmforge.model.checkpoint import save_model

    cfg = moe_config(vocab_size=96, n_experts=3, experts_per_token=2, moe_aux_coef=0.02)
    torch.manual_seed(1)
    ours = GPT(cfg).eval()
    with torch.no_grad():
        for b in ours.layers:  # made-up router weights: the routing must matter
            b.mlp.router.weight.normal_(0.0, 0.5)
    save_model(ours, tmp_path / "ours")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert theirs.config.num_local_experts == 3
    assert theirs.config.router_aux_loss_coef == 0.02
    x = torch.randint(0, 96, (3, 17))  # made-up token ids
    assert (logits_of(ours, x) - logits_of(theirs, x)).abs().max().item() <= TOL


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_stacked_layout_of_transformers_5_also_loads(family):
    from lmforge.model.hf import from_hf_config, from_hf_state_dict

    theirs = hf_mixtral(family=family)
    sd = theirs.state_dict()  # in memory: mlp.experts.gate_up_proj, (E, 2F, D)
    assert "model.layers.0.mlp.experts.gate_up_proj" in sd
    cfg = from_hf_config(theirs.config.to_dict())
    ours = GPT(cfg).eval()
    ours.load_state_dict(from_hf_state_dict(sd, cfg))
    x = torch.randint(0, 128, (2, 11))  # made-up token ids
    assert (logits_of(ours, x) - logits_of(theirs, x)).abs().max().item() <= TOL


def test_capacity_and_z_coef_survive_a_round_trip(tmp_path):
    from lmforge.model.checkpoint import load_model, save_model

    cfg = moe_config(capacity_factor=1.25, moe_z_coef=0.005, sliding_window=8)
    save_model(GPT(cfg), tmp_path / "m")
    back = load_model(tmp_path / "m").cfg
    assert (back.capacity_factor, back.moe_z_coef, back.sliding_window) == (1.25, 0.005, 8)


def test_moe_config_json_errors_name_the_key():
    from lmforge.model.hf import from_hf_config

    hf = dict(MIXTRAL, model_type="mixtral", num_experts_per_tok=6)
    with pytest.raises(ConfigError, match=r"num_experts_per_tok in config.json"):
        from_hf_config(hf)
    qwen = dict(QWEN2_MOE, model_type="qwen2_moe", num_local_experts=0)
    for bad, shown in [
        (dict(mlp_only_layers=[1]), "mlp_only_layers=[1]"),
        (dict(decoder_sparse_step=2), "decoder_sparse_step=2"),
        (dict(qkv_bias=False), "qkv_bias=false"),
    ]:
        with pytest.raises(
            ConfigError, match=re.escape(f"unsupported qwen2_moe options ['{shown}")
        ):
            from_hf_config(qwen | bad)


# --------------------------------------------------------------------------- transforms


def test_lora_adapts_the_attention_of_a_moe_model_and_merges_exactly():
    from lmforge.config import LoRAConfig
    from lmforge.model.lora import LoRALinear, apply_lora, merge_lora

    cfg = moe_config()
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    apply_lora(model, LoRAConfig(r=4), seed=0)  # the default targets: every projection there is
    adapted = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert adapted == {f"layers.{i}.attn.{w}" for i in range(2) for w in ("wqkv", "wo")}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.1)  # made-up adapters: B = 0 would change nothing
    x = torch.randint(0, cfg.vocab_size, (2, 9))  # made-up token ids
    before = logits_of(model, x)
    torch.testing.assert_close(logits_of(merge_lora(model), x), before, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="a mixtral model has no 'gate' projection"):
        apply_lora(GPT(cfg), LoRAConfig(r=4, targets=["gate"]))


QWEN_SHARED = dict(arch="qwen2_moe", qkv_bias=True, shared_expert_dim=64, norm_topk=False)


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("family", [{}, QWEN_SHARED], ids=["mixtral", "qwen2_moe"])
def test_quantized_moe_keeps_routers_and_experts_float_and_round_trips(tmp_path, method, family):
    from lmforge.compress.quantize import quantize_model
    from lmforge.config import QuantizeConfig
    from lmforge.model.checkpoint import load_model, save_quantized

    cfg = moe_config(dim=64, ffn_dim=64, **family)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (1, 12))  # made-up token ids
    ref = logits_of(model, x)
    kw = dict(group_size=32) if method == "int4" else {}
    spec = quantize_model(model, QuantizeConfig(method=method, **kw))
    # the router, the shared expert's gate and the stacked experts stay float; attention and
    # the shared expert (plain linear layers) are quantized
    kinds = {m.split(".", 2)[2] for m in spec.modules}
    shared = {"mlp.shared_w13", "mlp.shared_w2"} if family else set()
    assert kinds == {"attn.wqkv", "attn.wo"} | shared
    save_quantized(model, spec, tmp_path / "q")
    back = load_model(tmp_path / "q")
    assert torch.equal(logits_of(back, x), logits_of(model, x))
    assert (logits_of(back, x) - ref).abs().max().item() < 0.1


def test_tensor_parallel_refuses_a_mixture_of_experts():
    from lmforge.train.dist import check_tp

    with pytest.raises(ConfigError, match="a mixture of experts .* trains with dist.tp 1"):
        check_tp(moe_config(), 2)


def test_moe_trains_under_bf16_autocast():
    """Under autocast the experts compute in bf16 while the residual stream stays fp32 (the
    pretraining step on CUDA; simulated here with CPU autocast)."""
    cfg = moe_config(shared_expert_dim=32, arch="qwen2_moe", qkv_bias=True, norm_topk=False)
    torch.manual_seed(0)
    model = GPT(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 8))  # made-up token ids
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    loss = F.cross_entropy(logits.float().flatten(0, 1), x.flatten()) + aux_loss(model)
    loss.backward()
    assert model.layers[0].mlp.w13.grad is not None
    assert model.layers[0].mlp.router.weight.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(logits.float(), model(x), atol=0.05, rtol=0.05)
