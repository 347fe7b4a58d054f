"""GGUF export: every tensor read back equals ours (exactly in f32 once the RoPE permutation is
undone, to fp16 rounding in f16, within the q8_0 block bound), the metadata and tokenizer are
what llama.cpp reads, bad inputs are refused, and (when a llama.cpp build is at hand)
llama.cpp computes our logits."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lmforge.compress.gguf as gguf_mod
from lmforge.compress.gguf import export_gguf
from lmforge.config import ARCH_FEATURES, ConfigError, ModelConfig
from lmforge.io import atomic_dir
from lmforge.model.checkpoint import save_model
from lmforge.model.hf import to_hf_state_dict
from lmforge.model.transformer import GPT, apply_rope, rope_tables
from lmforge.tokenizer import SPECIAL_TOKENS, Tokenizer
from lmforge.tokenizer_train import train_tokenizer

gguf = pytest.importorskip("gguf")

EN = [f"The cat sat on mat number {i}, and then it's gone: don't worry!" for i in range(60)]
ZH = [f"第{i}回 孙悟空大闹天宫，玉帝请来如来佛祖。Python编程很有趣。" for i in range(40)]
Q8_BOUND = 0.5 + 127 * 2**-11  # q8_0 error per value, in units of its block's max|x| / 127


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(EN + ZH, vocab_size=400).save(d)
    return d


def make_checkpoint(path: Path, tok_dir: Path, arch="llama", **kw) -> GPT:
    """A tiny random model of `arch` saved with our tokenizer; vocab padded to a multiple of 64."""
    torch.manual_seed(0)
    n_tok = Tokenizer.load(tok_dir).vocab_size
    values = dict(vocab_size=64 * -(-n_tok // 64), dim=64, n_layer=2, n_head=4, n_kv_head=2)
    values |= dict(max_seq_len=64, init_std=0.1, tie_embeddings=False)
    if arch == "gpt2":
        values["n_kv_head"] = 4
    cfg = ModelConfig(arch=arch, **ARCH_FEATURES[arch], **(values | kw))
    model = GPT(cfg).eval()
    with torch.no_grad():  # norms and biases away from their 1 / 0 init, so mixing them shows
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    with atomic_dir(path) as tmp:
        save_model(model, tmp, tokenizer_dir=tok_dir, pad_token_id=0)
    return model


@pytest.fixture(scope="module")
def llama(tok_dir, tmp_path_factory):
    """(model, checkpoint dir, {outtype: gguf path}) for an untied GQA Llama."""
    d = tmp_path_factory.mktemp("llama")
    model = make_checkpoint(d / "model", tok_dir)
    files = {t: export_gguf(d / "model", d / f"m-{t}.gguf", outtype=t) for t in gguf_mod.OUTTYPES}
    return model, d / "model", files


def read(path: Path) -> tuple[dict, dict]:
    """(metadata values, {name: (GGML type, float32 array in our (out, in) layout)})."""
    r = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {
        t.name: (t.tensor_type, gguf.quants.dequantize(t.data, t.tensor_type)) for t in r.tensors
    }
    return fields, tensors


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of the export's RoPE row order: per head, pairs (j, j + D/2) back to halves."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def expected(model: GPT) -> dict[str, np.ndarray]:
    """Our tensors under llama.cpp's names, through the HF names and gguf's own HF -> GGUF name
    table (the one convert_hf_to_gguf.py uses); GPT-2's Conv1D weights are transposed back."""
    cfg = model.cfg
    arch = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2", "gpt2": "GPT2"}[cfg.arch]
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch), cfg.n_layer)
    out = {}
    for hf_name, t in to_hf_state_dict(model.state_dict(), cfg).items():
        if cfg.arch == "gpt2" and t.ndim == 2 and ".h." in hf_name:
            t = t.t()
        out[names.get_name(hf_name, try_suffixes=(".weight", ".bias"))] = t.float().numpy()
    return out


def undo_rope_order(name: str, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    if cfg.arch in ("llama", "mistral") and (".attn_q." in name or ".attn_k." in name):
        return unpermute(w, cfg.n_head if ".attn_q." in name else cfg.n_kv_head)
    return w


# --------------------------------------------------------------------------- tensors


def test_f32_tensors_are_ours_exactly(llama):
    model, _, files = llama
    _, tensors = read(files["f32"])
    want = expected(model)
    assert sorted(tensors) == sorted(want)
    for name, (qtype, got) in tensors.items():
        assert qtype == gguf.GGMLQuantizationType.F32, name
        np.testing.assert_array_equal(undo_rope_order(name, got, model.cfg), want[name], name)
    # the permutation really moved rows: without undoing it q differs
    assert not np.array_equal(tensors["blk.0.attn_q.weight"][1], want["blk.0.attn_q.weight"])


def test_permuted_q_k_with_adjacent_pair_rope_give_our_attention_scores():
    """llama.cpp's `llama` RoPE (ggml's normal mode) rotates (x[2i], x[2i+1]) by pos * base^(-2i/D);
    ours rotates (x[i], x[i + D/2]). On permuted rows it must produce the same q.k."""
    torch.manual_seed(0)
    H, D, dim, T, base = 2, 8, 16, 5, 10000.0
    wq, wk = torch.randn(H * D, dim), torch.randn(H * D, dim)
    x = torch.randn(T, dim)

    def ours(w):  # (T, H, D), rotated as our model does
        cos, sin = rope_tables(D, T, base)
        return apply_rope((x @ w.T).view(1, T, H, D), cos.unsqueeze(1), sin.unsqueeze(1))[0]

    def ggml_normal(w):
        y = (x @ w.T).view(T, H, D // 2, 2)
        theta = torch.arange(T)[:, None] * base ** (-2 * torch.arange(D // 2) / D)  # (T, D/2)
        c, s = theta.cos()[:, None], theta.sin()[:, None]
        y0, y1 = y[..., 0], y[..., 1]
        return torch.stack((y0 * c - y1 * s, y0 * s + y1 * c), dim=-1).view(T, H, D)

    scores = torch.einsum("thd,shd->hts", ours(wq), ours(wk))
    theirs = ggml_normal(gguf_mod.permute_rope(wq, H)), ggml_normal(gguf_mod.permute_rope(wk, H))
    torch.testing.assert_close(torch.einsum("thd,shd->hts", *theirs), scores)


def test_f16_rounds_matrices_and_keeps_norms_f32(llama):
    model, _, files = llama
    fields, tensors = read(files["f16"])
    want = expected(model)
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    for name, (qtype, got) in tensors.items():
        got = undo_rope_order(name, got, model.cfg)
        if want[name].ndim == 1:
            assert qtype == gguf.GGMLQuantizationType.F32, name
            np.testing.assert_array_equal(got, want[name], name)
        else:
            assert qtype == gguf.GGMLQuantizationType.F16, name
            np.testing.assert_array_equal(got, want[name].astype(np.float16).astype(np.float32))


def q8_error_ok(got: np.ndarray, want: np.ndarray) -> bool:
    blocks = want.reshape(-1, 32)
    scale = np.abs(blocks).max(axis=1, keepdims=True) / 127
    return bool((np.abs(got.reshape(-1, 32) - blocks) <= Q8_BOUND * scale + 1e-9).all())


def test_q8_0_within_the_block_bound(llama):
    model, _, files = llama
    fields, tensors = read(files["q8_0"])
    want = expected(model)
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    for name, (qtype, got) in tensors.items():
        got = undo_rope_order(name, got, model.cfg)
        if want[name].ndim == 1:
            assert qtype == gguf.GGMLQuantizationType.F32, name
            np.testing.assert_array_equal(got, want[name], name)
        else:
            assert qtype == gguf.GGMLQuantizationType.Q8_0, name
            assert q8_error_ok(got, want[name]), name
            assert not np.array_equal(got, want[name])  # it did quantize


def test_q8_0_falls_back_to_f16_for_rows_that_are_not_whole_blocks(tok_dir, tmp_path):
    model = make_checkpoint(tmp_path / "m", tok_dir, dim=40, n_head=2, n_kv_head=2)  # ffn 128
    _, tensors = read(export_gguf(tmp_path / "m", tmp_path / "m.gguf", outtype="q8_0"))
    Q = gguf.GGMLQuantizationType
    types = {name: qtype for name, (qtype, _) in tensors.items()}
    assert types["blk.0.ffn_down.weight"] == Q.Q8_0  # rows of ffn_dim = 128
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == Q.F16  # rows of 40
    assert types["blk.0.attn_norm.weight"] == Q.F32
    assert model.cfg.ffn_dim == 128


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gpt2"])
def test_other_families_export_exactly(arch, tok_dir, tmp_path):
    kw = {"sliding_window": 16} if arch == "mistral" else {}
    model = make_checkpoint(tmp_path / "m", tok_dir, arch=arch, tie_embeddings=True, **kw)
    fields, tensors = read(export_gguf(tmp_path / "m", tmp_path / "m.gguf"))
    want = expected(model)
    want.pop("output.weight", None)  # tied: llama.cpp reads token_embd.weight for the output
    assert sorted(tensors) == sorted(want)
    for name, (_, got) in tensors.items():
        np.testing.assert_array_equal(undo_rope_order(name, got, model.cfg), want[name], name)
    gguf_arch = {"qwen2": "qwen2", "mistral": "llama", "gpt2": "gpt2"}[arch]
    assert fields["general.architecture"] == gguf_arch
    if arch == "qwen2":  # NeoX RoPE in llama.cpp: rows unpermuted, biases present
        assert "blk.0.attn_q.bias" in tensors
    if arch == "mistral":  # llama.cpp's llama has no sliding window: exact up to the window
        assert fields["llama.context_length"] == 16
    if arch == "gpt2":
        assert fields["gpt2.attention.layer_norm_epsilon"] == pytest.approx(model.cfg.norm_eps)
        assert "gpt2.rope.freq_base" not in fields


def test_tied_embeddings_write_no_output_tensor(tok_dir, tmp_path):
    make_checkpoint(tmp_path / "m", tok_dir, tie_embeddings=True)
    _, tensors = read(export_gguf(tmp_path / "m", tmp_path / "m.gguf"))
    assert "output.weight" not in tensors and "token_embd.weight" in tensors


# --------------------------------------------------------------------------- metadata


def test_metadata_and_tokenizer(llama, tok_dir):
    model, ckpt, files = llama
    cfg = model.cfg
    fields, _ = read(files["f32"])
    assert fields["general.architecture"] == "llama"
    assert fields["general.file_type"] == gguf.LlamaFileType.ALL_F32
    want = {
        "llama.context_length": cfg.max_seq_len,
        "llama.embedding_length": cfg.dim,
        "llama.block_count": cfg.n_layer,
        "llama.feed_forward_length": cfg.ffn_dim,
        "llama.attention.head_count": cfg.n_head,
        "llama.attention.head_count_kv": cfg.n_kv_head,
        "llama.rope.dimension_count": cfg.head_dim,
        "llama.vocab_size": cfg.vocab_size,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "dbrx",
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.chat_template": Tokenizer.load(tok_dir).chat_template,
    }
    assert {k: fields[k] for k in want} == want
    assert fields["llama.rope.freq_base"] == cfg.rope_theta
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps)
    assert "tokenizer.ggml.unknown_token_id" not in fields  # byte-level: nothing is unknown

    spec = json.loads((ckpt / "tokenizer.json").read_text())
    vocab = {i: t for t, i in spec["model"]["vocab"].items()}
    n_tok = len(vocab)
    assert fields["tokenizer.ggml.tokens"][:n_tok] == [vocab[i] for i in range(n_tok)]
    assert fields["tokenizer.ggml.tokens"][n_tok:] == [
        f"[PAD{i}]" for i in range(n_tok, cfg.vocab_size)
    ]
    assert len(fields["tokenizer.ggml.tokens"]) == cfg.vocab_size > n_tok
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    assert fields["tokenizer.ggml.merges"] == merges and len(merges) > 50
    T = gguf.TokenType
    n_special = len(SPECIAL_TOKENS)
    types = fields["tokenizer.ggml.token_type"]
    assert types[:n_special] == [T.CONTROL] * n_special
    assert types[n_special:n_tok] == [T.NORMAL] * (n_tok - n_special)
    assert types[n_tok:] == [T.UNUSED] * (cfg.vocab_size - n_tok)


def test_chat_template_and_add_bos_give_our_chat_prompt(llama, tok_dir):
    """What llama.cpp's chat builds from the GGUF metadata is our chat prompt, BOS once. It
    renders tokenizer.chat_template, strips a leading BOS when add_bos_token is set and lets
    the tokenizer add it (common/chat.cpp); here that rule is applied to the stored fields."""
    from lmforge.infer.chat import chat_prompt_ids
    from lmforge.tokenizer import render_chat

    fields, _ = read(llama[2]["f32"])
    tok = Tokenizer.load(tok_dir)
    bos = fields["tokenizer.ggml.tokens"][fields["tokenizer.ggml.bos_token_id"]]
    assert fields["tokenizer.ggml.add_bos_token"] is True and bos == "<|bos|>"
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": ZH[0]}]
    text = render_chat(
        fields["tokenizer.chat_template"], msgs, add_generation_prompt=True, bos_token=bos
    )
    assert text.startswith(bos)  # the template writes BOS itself, for tools that do not add it
    llama_cpp = [fields["tokenizer.ggml.bos_token_id"]] + tok.encode_rendered(text[len(bos) :])
    assert llama_cpp == chat_prompt_ids(tok, msgs)


def test_pre_tokenizer_type_follows_the_split_regex(tmp_path):
    seq = lambda pattern: {  # noqa: E731
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated"},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False},
        ],
    }
    f = tmp_path / "tokenizer.json"
    pre = gguf_mod._pre_tokenizer
    assert pre({"pre_tokenizer": seq(gguf_mod.SPLIT_PATTERN)}, f) == "dbrx"
    assert pre({"pre_tokenizer": seq(gguf_mod.QWEN2_PATTERN)}, f) == "qwen2"
    llama3 = {"pre_tokenizer": seq(gguf_mod.LLAMA3_PATTERN), "model": {"ignore_merges": True}}
    assert pre(llama3, f) == "llama-bpe"
    assert pre({**llama3, "model": {}}, f) == "dbrx"
    gpt2 = {"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}
    assert pre(gpt2, f) == "gpt-2"
    with pytest.raises(ConfigError, match="no pre-tokenizer type"):
        pre({"pre_tokenizer": seq(r"\w+|\s+")}, f)


@pytest.mark.parametrize("pre", ["smollm", "gpt-2", "llama-bpe", "qwen2", "default"])
def test_an_imported_tokenizer_exports_with_its_pre_tokenizer_type(pre, tmp_path):
    """`lmforge import` rebuilds llama.cpp's splits of the file's type as Split steps; exporting
    the imported model must name a type with the same splits (SmolLM2's "smollm" was refused).
    Made-up metadata: the byte alphabet as the vocabulary, no merges."""
    import tokenizers as tk

    from lmforge.model.gguf_import import PRE_SPLITS, build_tokenizer

    alphabet = sorted(tk.pre_tokenizers.ByteLevel.alphabet())
    meta = {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": alphabet + ["<s>"],
        "tokenizer.ggml.token_type": [1] * len(alphabet) + [3],
        "tokenizer.ggml.merges": [],
        "tokenizer.ggml.bos_token_id": len(alphabet),
        "tokenizer.ggml.eos_token_id": len(alphabet),
    }
    spec, _ = build_tokenizer(meta, tmp_path)
    name = gguf_mod._pre_tokenizer(json.loads(spec), tmp_path / "tokenizer.json")
    assert PRE_SPLITS[name] == PRE_SPLITS[pre]
    assert (name in ("llama-bpe", "llama3")) == (pre == "llama-bpe")  # ignore_merges kept


# --------------------------------------------------------------------------- errors


def test_refusals_name_the_path_and_the_problem(llama, tmp_path):
    _, ckpt, files = llama
    with pytest.raises(ConfigError, match=f"{files['f32']} already exists"):
        export_gguf(ckpt, files["f32"])
    with pytest.raises(ConfigError, match="checkpoint directory not found: .*nope"):
        export_gguf(tmp_path / "nope", tmp_path / "a.gguf")
    with pytest.raises(ConfigError, match="outtype 'q4_0' is not supported"):
        export_gguf(ckpt, tmp_path / "a.gguf", outtype="q4_0")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "x"}))
    with pytest.raises(ConfigError, match="adapter.* is a LoRA adapter.*--merge-lora"):
        export_gguf(adapter, tmp_path / "a.gguf")
    quantized = tmp_path / "q"
    quantized.mkdir()
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "lmforge", "bits": 8}
    (quantized / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="q/config.json has a quantization_config.*float model"):
        export_gguf(quantized, tmp_path / "a.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "q"]  # nothing written


def test_a_checkpoint_without_tokenizer_is_refused_and_leaves_nothing(llama, tmp_path):
    ckpt = tmp_path / "no_tok"
    ckpt.mkdir()
    for name in ("config.json", "model.safetensors"):
        (ckpt / name).write_bytes((llama[1] / name).read_bytes())
    with pytest.raises(ConfigError, match="no_tok has no tokenizer.json"):
        export_gguf(ckpt, tmp_path / "out" / "a.gguf")
    assert list((tmp_path / "out").iterdir()) == []


def test_missing_gguf_package_names_the_extra(llama, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    with pytest.raises(ConfigError, match=r"pip install 'lmforge\[gguf\]'"):
        export_gguf(llama[1], tmp_path / "a.gguf")


def test_a_failure_midway_leaves_nothing_behind(llama, tmp_path, monkeypatch):
    def broken(sd, cfg):
        yield "token_embd.weight", sd["tok_emb.weight"]
        raise OSError("disk full")

    monkeypatch.setattr(gguf_mod, "gguf_tensors", broken)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(llama[1], tmp_path / "a.gguf")
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_the_file(llama, tmp_path):
    out = tmp_path / "cli.gguf"
    args = ["export", llama[1], out, "--format", "gguf", "--outtype", "q8_0"]
    r = subprocess.run(
        [sys.executable, "-m", "lmforge", *map(str, args)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stdout and "q8_0" in r.stdout
    fields, _ = read(out)
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0


# --------------------------------------------------------------------------- llama.cpp itself

# runs in the llama-cpp-python environment: tokenizes texts, and returns the logits of `ids`
# (with an f32 KV cache: llama.cpp's default f16 cache alone costs ~1e-3 on these logits)
PROBE = r"""
import json, sys
import numpy as np
import llama_cpp.llama_cpp as lib
from llama_cpp import Llama
args = json.loads(sys.argv[1])
# llama.cpp's extra weight buffers off (AMX int8 tiles, repacked Q4_0/Q8_0): on an AMX host in a
# VM its AMX path segfaults on the first quantized product; Llama() takes no option for it
default = lib.llama_model_default_params
def without_extra_bufts():
    params = default()
    params.use_extra_bufts = False
    return params
lib.llama_model_default_params = without_extra_bufts
out = {}
for path in args["models"]:
    llm = Llama(model_path=path, n_ctx=args["n_ctx"], logits_all=True, n_threads=2,
                type_k=0, type_v=0, verbose=False)  # 0 = GGML_TYPE_F32
    tokens = [llm.tokenize(t.encode(), add_bos=True, special=False) for t in args["texts"]]
    llm.eval(args["ids"])
    out[path] = {"tokens": tokens, "logits": np.asarray(llm.scores[: len(args["ids"])]).tolist()}
print(json.dumps(out))
"""


def llama_cpp_python() -> str:
    """The python of an environment with llama-cpp-python (LMFORGE_LLAMA_CPP_PYTHON), or skip."""
    python = os.environ.get("LMFORGE_LLAMA_CPP_PYTHON")
    if not python:
        pytest.skip("set LMFORGE_LLAMA_CPP_PYTHON to a python that can import llama_cpp")
    if subprocess.run([python, "-c", "import llama_cpp"], capture_output=True).returncode:
        pytest.skip(f"{python} cannot import llama_cpp")
    return python


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
def test_llama_cpp_computes_our_logits_and_tokens(arch, tok_dir, tmp_path):
    """f32: our logits to 1e-5 (GPT-2 to 3e-3: ggml's GELU reads an fp16 table); q8_0 within
    6% of the largest logit; llama.cpp's token ids (BOS included) equal ours."""
    python = llama_cpp_python()
    model = make_checkpoint(tmp_path / "m", tok_dir, arch=arch, tie_embeddings=arch == "qwen2")
    files = {
        t: str(export_gguf(tmp_path / "m", tmp_path / f"{t}.gguf", t)) for t in ("f32", "q8_0")
    }
    tok = Tokenizer.load(tok_dir)
    texts = EN[:2] + ZH[:2] + ["  spaces\n\nand\ttabs 12345 <|eos|> 'll"]
    ids = [tok.bos_id] + tok.encode(EN[3] + ZH[3])[:40]
    args = {"models": list(files.values()), "n_ctx": 64, "texts": texts, "ids": ids}
    r = subprocess.run([python, "-c", PROBE, json.dumps(args)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
    for kind, res in ((kind, got[path]) for kind, path in files.items()):
        assert res["tokens"] == [[tok.bos_id] + tok.encode(t) for t in texts], kind
        err = np.abs(np.array(res["logits"]) - ours).max()
        if kind == "f32":
            assert err < (3e-3 if arch == "gpt2" else 1e-5), (kind, err)
        else:
            assert err < 0.06 * np.abs(ours).max(), (kind, err)


# runs in the llama-cpp-python environment: the prompt ids its chat path builds from the GGUF's
# own template and BOS settings (create_chat_completion tokenizes through llm.tokenize)
CHAT_PROBE = r"""
import json, sys
from llama_cpp import Llama
args = json.loads(sys.argv[1])
llm = Llama(model_path=args["model"], n_ctx=args["n_ctx"], n_threads=2, verbose=False)
seen = []
tokenize = llm.tokenize
def record(text, add_bos=True, special=False):
    ids = tokenize(text, add_bos=add_bos, special=special)
    seen.append(ids)
    return ids
llm.tokenize = record
llm.create_chat_completion(messages=args["messages"], max_tokens=1, temperature=0.0)
print(json.dumps({"prompt": seen[0], "plain": tokenize(args["text"].encode(), add_bos=True)}))
"""


def test_llama_cpp_chat_encodes_our_chat_prompt(llama, tok_dir):
    """llama-cpp-python's own chat path over our f32 GGUF: the prompt it feeds the model is our
    chat prompt, BOS once, in English and Chinese; plain text gets BOS too."""
    from lmforge.infer.chat import chat_prompt_ids

    python = llama_cpp_python()
    tok = Tokenizer.load(tok_dir)
    for text in (EN[0], ZH[0]):
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
        args = {"model": str(llama[2]["f32"]), "n_ctx": 64, "messages": msgs, "text": text}
        r = subprocess.run(
            [python, "-c", CHAT_PROBE, json.dumps(args)], capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr[-2000:]
        got = json.loads(r.stdout.strip().splitlines()[-1])
        assert got["prompt"] == chat_prompt_ids(tok, msgs)
        assert got["prompt"].count(tok.bos_id) == 1
        assert got["plain"] == [tok.bos_id] + tok.encode(text)
