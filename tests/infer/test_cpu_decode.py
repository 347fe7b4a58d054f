"""The CPU decode step against the model's own cached forward, and the weight re-layout."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.infer.cpu_decode import CpuDecoder, relayout
from lmforge.infer.generate import generate
from lmforge.model.transformer import GPT

BASE = dict(vocab_size=96, dim=64, n_layer=2, n_head=4)
CONFIGS = {
    "mha-untied": dict(vocab_size=96, dim=64, n_layer=2, n_head=4, tie_embeddings=False),
    "gqa-tied": dict(vocab_size=96, dim=64, n_layer=2, n_head=4, n_kv_head=2),
    # 97 outputs split into no even blocks: the head falls back to one block
    "odd-vocab": dict(vocab_size=97, dim=48, n_layer=1, n_head=3, ffn_dim=120),
    "qwen2-qkv-bias": BASE | dict(n_kv_head=2, arch="qwen2", qkv_bias=True),
    # a window of 6 binds from position 6 on; head_dim 24 is not dim / n_head
    "mistral-window-head_dim": BASE
    | dict(n_kv_head=2, arch="mistral", sliding_window=6, head_dim=24, tie_embeddings=False),
}
GPT2 = BASE | dict(arch="gpt2", norm="layernorm", mlp="gelu", pos="learned")
GPT2 |= dict(qkv_bias=True, bias=True)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_step_matches_cached_forward(name, threads):
    torch.manual_seed(0)
    model = GPT(ModelConfig(max_seq_len=32, **CONFIGS[name])).eval()
    with torch.no_grad():  # biases start at zero: make them matter
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_()
    ids = torch.randint(0, model.cfg.vocab_size, (20,))
    with torch.no_grad():
        ref_cache = model.new_cache(1)
        ref = [model(ids[:5].view(1, -1), ref_cache, 0)[0, -1]]
        ref += [model(ids[p].view(1, 1), ref_cache, p)[0, -1] for p in range(5, 20)]
        decoder = CpuDecoder(model, threads=threads)
        cache = model.new_cache(1)
        got = [decoder.prefill(ids[:5], cache)]
        got += [decoder.step(ids[p : p + 1], cache, p) for p in range(5, 20)]
    # fp32, the same arithmetic in another kernel order: agreement to rounding
    for p, (a, b) in enumerate(zip(ref, got)):
        assert (a - b).abs().max().item() < 1e-5, f"position {p + 4}"
    for layer in range(model.cfg.n_layer):  # the step wrote the same keys and values
        assert (ref_cache.k[layer] - cache.k[layer]).abs().max().item() < 1e-5
        assert (ref_cache.v[layer] - cache.v[layer]).abs().max().item() < 1e-5


def test_relayout_keeps_values_and_training():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=96, dim=64, n_layer=2, n_head=4, max_seq_len=32)
    a, b = GPT(cfg), GPT(cfg)
    b.load_state_dict(a.state_dict())
    relayout(b)
    relayout(b)  # idempotent
    assert not b.layers[0].attn.wqkv.weight.is_contiguous()  # 192 outputs > 64 inputs
    assert b.layers[0].mlp.w2.weight.is_contiguous()  # down-projections stay as they are
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
    x = torch.randint(0, 96, (2, 16))
    for m in (a, b):
        F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    for (k, p), q in zip(a.named_parameters(), b.parameters()):
        assert (p.grad - q.grad).abs().max().item() < 1e-6, k


def test_generate_cpu_path_equals_forward_path():
    """generate() takes the decoder on CPU; a compiled-looking wrapper takes the plain forward."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=96, dim=64, n_layer=2, n_head=4, max_seq_len=64)).eval()

    class Wrapped(torch.nn.Module):  # not a GPT: generate() falls back to the model's forward
        def __init__(self, inner):
            super().__init__()
            self.inner, self.cfg, self.tok_emb = inner, inner.cfg, inner.tok_emb

        def forward(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

        def new_cache(self, *args):
            return self.inner.new_cache(*args)

    fast = list(generate(model, [1, 2, 3], 40))
    plain = list(generate(Wrapped(model), [1, 2, 3], 40))
    assert fast == plain
    sampled = [
        list(generate(m, [1, 2], 30, temperature=1.0, seed=3)) for m in (model, Wrapped(model))
    ]
    assert sampled[0] == sampled[1]


def test_gpt2_is_not_supported_and_generate_uses_the_forward():
    torch.manual_seed(0)
    model = GPT(ModelConfig(max_seq_len=64, **GPT2)).eval()
    assert not CpuDecoder.supports(model)
    assert all(CpuDecoder.supports(GPT(ModelConfig(**c))) for c in CONFIGS.values())
    ids = [1, 2, 3]
    out = list(generate(model, ids, 10))  # greedy: each token is the forward's argmax
    with torch.no_grad():
        for tok in out:
            assert tok == model(torch.tensor([ids]))[0, -1].argmax().item()
            ids.append(tok)
