"""The pieces of distributed training that need no process group: the tensor-parallel row
layout of the fused projections, the refusals of impossible layouts, gradient clipping,
activation checkpointing. The runs under torchrun are in test_dist.py."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ConfigError, DistConfig, ModelConfig
from lmforge.model.transformer import GPT
from lmforge.train import dist

GQA = ModelConfig(vocab_size=64, dim=32, n_layer=1, n_head=4, n_kv_head=2, max_seq_len=16)


def test_tp_layout_gives_each_rank_whole_heads_of_q_k_and_v():
    # wqkv rows: q heads 0-3, k heads 0-1, v heads 0-1, head_dim 8 each
    rows = torch.arange((4 + 2 + 2) * 8)
    laid = rows[dist.relayout_index(GQA, "layers.0.attn.wqkv.weight", 1, 2)]
    head = lambda h: list(range(8 * h, 8 * h + 8))  # noqa: E731
    rank0 = head(0) + head(1) + head(4) + head(6)  # q 0-1, k 0, v 0
    rank1 = head(2) + head(3) + head(5) + head(7)  # q 2-3, k 1, v 1
    assert laid.tolist() == rank0 + rank1
    # gate and up columns of the SwiGLU MLP
    ffn = GQA.ffn_dim
    laid = torch.arange(2 * ffn)[dist.relayout_index(GQA, "layers.0.mlp.w13.bias", 1, 2)]
    half = ffn // 2
    expected = [
        *range(half),
        *range(ffn, ffn + half),
        *range(half, ffn),
        *range(ffn + half, 2 * ffn),
    ]
    assert laid.tolist() == expected


def test_relayout_between_tp_degrees_composes():
    name = "layers.0.attn.wqkv.weight"
    rows = torch.arange((4 + 2 + 2) * 8)
    as2 = rows[dist.relayout_index(GQA, name, 1, 2)]
    assert torch.equal(as2[dist.relayout_index(GQA, name, 2, 1)], rows)
    as1_via_2 = rows[dist.relayout_index(GQA, name, 1, 2)][dist.relayout_index(GQA, name, 2, 1)]
    assert torch.equal(as1_via_2, rows)
    # untouched: other parameters, the same degree, and GPT-2's unfused MLP
    assert dist.relayout_index(GQA, "layers.0.attn.wo.weight", 1, 2) is None
    assert dist.relayout_index(GQA, name, 2, 2) is None
    gelu = ModelConfig(
        vocab_size=64, dim=32, n_layer=1, n_head=4, max_seq_len=16, arch="gpt2",
        norm="layernorm", mlp="gelu", pos="learned", qkv_bias=True, bias=True,
    )  # fmt: skip
    assert dist.relayout_index(gelu, "layers.0.mlp.w13.weight", 1, 2) is None


def test_take_rows_on_a_plain_tensor():
    t = torch.arange(12.0).view(6, 2)
    dist.take_rows(t, torch.tensor([5, 4, 3, 2, 1, 0]))
    assert t[:, 0].tolist() == [10, 8, 6, 4, 2, 0]


def test_tp_degree_must_divide_heads_and_mlp():
    with pytest.raises(ConfigError, match=r"dist.tp \(4\) must divide model.n_kv_head \(2\)"):
        dist.check_tp(GQA, 4)
    dist.check_tp(GQA, 2)


@pytest.mark.parametrize(
    "world,cfg,message",
    [
        (
            2,
            DistConfig(strategy="ddp", tp=3),
            r"dist.tp \(3\) must divide the number of processes \(2\)",
        ),
        (4, DistConfig(strategy="ddp", tp=2), "combines with fsdp, not ddp"),
        (2, DistConfig(), "pass --dist.strategy ddp or fsdp"),
    ],
)
def test_impossible_layouts_are_refused_before_joining(world, cfg, message, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match=message):
        dist.setup(cfg)
    assert not torch.distributed.is_initialized()


def test_single_process_setup_and_config_checks(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = dist.setup(DistConfig(strategy="fsdp"))
    assert not info.enabled and not info.sharded and info.dp_size == 1
    with pytest.raises(ConfigError, match="cpu_offload needs dist.strategy fsdp"):
        DistConfig(strategy="ddp", cpu_offload=True)
    with pytest.raises(ConfigError, match="strategy"):
        DistConfig(strategy="zero3")


def test_clip_grad_norm_matches_torch():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        p.grad = torch.randn(5, 3) * 3
        q.grad = p.grad.clone()
    ours = dist.clip_grad_norm(iter(a), 1.0)  # plain tensors: torch's own, any iterable
    theirs = torch.nn.utils.clip_grad_norm_(b, 1.0)
    torch.testing.assert_close(ours, theirs)
    for p, q in zip(a, b):
        torch.testing.assert_close(p.grad, q.grad)
    assert ours > 1.0  # the case that clips


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = GPT(GQA)
    x = torch.randint(0, 64, (2, 16))

    def grads(recompute: bool) -> list[torch.Tensor]:
        model.zero_grad()
        model.activation_checkpointing = recompute
        logits = model(x[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
        return [p.grad.clone() for p in model.parameters()]

    for g1, g2 in zip(grads(False), grads(True)):
        torch.testing.assert_close(g2, g1, rtol=0, atol=0)
    with torch.no_grad():  # inference never recomputes (and never fails for lack of grad)
        model(x)


def test_meta_model_materialized_in_one_process_equals_a_plain_one():
    """materialize() draws the same weights as GPT(cfg) after the same seed (here without
    sharding; test_dist.py checks it with FSDP2 and tensor parallel), and keeps the tie."""
    torch.manual_seed(3)
    plain = GPT(GQA)
    torch.manual_seed(3)
    with torch.device("meta"):
        model = GPT(GQA)
    dist.materialize(model, torch.device("cpu"), tp=1)
    assert model.lm_head.weight is model.tok_emb.weight
    assert plain.lm_head.weight is plain.tok_emb.weight
    for (name, a), (_, b) in zip(plain.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    torch.testing.assert_close(model.rope_cos, plain.rope_cos)
