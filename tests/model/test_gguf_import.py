"""GGUF import: our own f32 export comes back bit-identical; on f32 and q8_0 files the imported
model computes what transformers' GGUF loader computes and the rebuilt tokenizer gives its ids;
every listed GGML type goes through gguf's dequantizer; bad inputs are refused, nothing written."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lmforge.compress import gguf as export_mod
from lmforge.compress.gguf import export_gguf
from lmforge.config import ConfigError
from lmforge.model.checkpoint import load_model
from lmforge.model.gguf_import import TENSOR_TYPES, import_gguf, read_tensor
from lmforge.model.load import load
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer_train import train_tokenizer

gguf = pytest.importorskip("gguf")
sys.path.insert(0, str(Path(__file__).parents[1] / "compress"))
from test_gguf import EN, ZH, make_checkpoint  # noqa: E402  (the exporter tests' tiny models)

# made-up probe texts: English, Chinese, code, and text that spells special tokens
TEXTS = [
    "The cat sat on mat number 12345, and then it's gone: don't worry!",
    "孙悟空大闹天宫，玉帝请来如来佛祖。Python编程很有趣。",
    "def f(x):\n    return x ** 2  # square\n\n\nprint(f(3))",
    "<|im_start|>user\nhi<|im_end|>  trailing   spaces ",
]
CHAT = [{"role": "user", "content": "Hello, 你好!"}, {"role": "assistant", "content": "Hi."}]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict:
    """{(arch, outtype): (checkpoint dir, gguf file, imported dir)} for tiny llama and qwen2."""
    d = tmp_path_factory.mktemp("gguf_import")
    train_tokenizer(EN + ZH, vocab_size=400).save(d / "tok")
    out = {}
    for arch in ("llama", "qwen2"):
        make_checkpoint(d / arch, d / "tok", arch=arch)
        for t in ("f32", "q8_0"):
            g = export_gguf(d / arch, d / f"{arch}-{t}.gguf", outtype=t)
            out[arch, t] = d / arch, g, import_gguf(g, d / f"{arch}-{t}-hf")
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_f32_export_round_trips_bit_identical(made, arch):
    ckpt, _, imported = made[arch, "f32"]
    want, got = (
        load_file(str(ckpt / "model.safetensors")),
        load_file(str(imported / "model.safetensors")),
    )
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert torch.equal(got[name], t), name
    model, tok = load(imported)  # lmforge opens it, tokenizer and all
    assert model.cfg.arch == arch and not model.cfg.tie_embeddings
    assert tok.chat_template == Tokenizer.load(ckpt).chat_template


def test_tied_embeddings_import_without_lm_head(made, tmp_path):
    """No output.weight in the file: config.json says tied, the safetensors has no lm_head."""
    tok_dir = made["llama", "f32"][0].parent / "tok"
    make_checkpoint(tmp_path / "tied", tok_dir, tie_embeddings=True)
    g = export_gguf(tmp_path / "tied", tmp_path / "tied.gguf")
    out = import_gguf(g, tmp_path / "hf")
    want, got = (
        load_file(str(tmp_path / "tied" / "model.safetensors")),
        load_file(str(out / "model.safetensors")),
    )
    assert "lm_head.weight" not in got and sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert load_model(out).cfg.tie_embeddings


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_logits_match_transformers_gguf_loader(made, arch, outtype):
    from transformers import AutoModelForCausalLM

    _, g, imported = made[arch, outtype]
    oracle = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(imported, dtype=torch.float32)  # transformers
    ours = load_model(imported)
    tok = Tokenizer.load(imported)
    for text in TEXTS[:3]:
        ids = torch.tensor([[tok.bos_id, *tok.encode(text)]])
        with torch.no_grad():
            want = oracle(ids).logits
            torch.testing.assert_close(ours(ids).float(), want, atol=1e-4, rtol=0)
            torch.testing.assert_close(theirs(ids).logits, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tokenizer_ids_match_transformers_gguf_tokenizer(made, arch):
    from transformers import AutoTokenizer

    ckpt, g, imported = made[arch, "q8_0"]
    oracle = AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
    theirs = AutoTokenizer.from_pretrained(imported)
    ours, original = Tokenizer.load(imported), Tokenizer.load(ckpt)
    for text in TEXTS:
        want = oracle(text)["input_ids"]
        if arch == "llama":  # transformers opens any qwen2 directory with Qwen2Tokenizer,
            # which swaps in Qwen2's own split (single digits) for tokenizer.json's: this
            # tokenizer's digits then differ, for lmforge's own save_model output too
            assert theirs(text)["input_ids"] == want, text
        assert want[0] == ours.bos_id and ours.prepend_bos  # the file's add-BOS flag
        assert ours.encode_rendered(text) == want[1:], text  # specials in text stay whole
        assert ours.encode(text) == original.encode(text), text
    assert ours.chat_template == original.chat_template
    want = oracle.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True)
    want = want["input_ids"] if hasattr(want, "keys") else want
    assert ours.encode_chat(CHAT, add_generation_prompt=True) == list(want)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (
        original.bos_id,
        original.eos_id,
        original.pad_id,
    )
    assert ours.stop_ids() == original.stop_ids()


def test_bf16_and_provenance(made, tmp_path):
    import hashlib
    import json

    _, g, _ = made["llama", "f32"]
    out = import_gguf(g, tmp_path / "bf16", dtype="bf16")
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.bfloat16}
    note = json.loads((out / "provenance.json").read_text())
    assert note["sha256"] == hashlib.sha256(g.read_bytes()).hexdigest()
    assert note["source"] == str(g.resolve()) and "license" in note
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


# --------------------------------------------------------------------------- dequantization


def test_every_listed_type_reads_through_ggufs_dequantizer(tmp_path):
    """A file with one (64, 256) tensor per listed type; quantizable types from made-up floats,
    the others (K-quants: gguf has no numpy quantizer for them) from made-up random bytes. That
    each comes back as gguf.quants.dequantize of its own type proves the right dequantizer ran."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 256)).astype(np.float32)
    T = gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(str(tmp_path / "types.gguf"), "llama")
    for name in TENSOR_TYPES:
        qtype = T[name]
        try:
            data = gguf.quants.quantize(x, qtype)
        except (NotImplementedError, gguf.quants.QuantError):
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            # bytes below 0x3C: every fp16 scale inside is finite (|d| < 1), so no NaN
            data = rng.integers(0, 0x3C, (64, 256 // block * size), dtype=np.uint8)
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = gguf.GGUFReader(tmp_path / "types.gguf")
    assert [t.name for t in r.tensors] == list(TENSOR_TYPES)
    for t in r.tensors:
        got = read_tensor(t, gguf).numpy()
        assert got.shape == (64, 256), t.name
        np.testing.assert_array_equal(got, gguf.quants.dequantize(t.data, t.tensor_type), t.name)
        if t.name in ("F32", "F16", "BF16", "Q8_0"):  # the ones made from x come back near it
            assert np.abs(got - x).max() < 0.05, t.name


# --------------------------------------------------------------------------- bad inputs


def write_gguf(path: Path, arch: str) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def refused(src: Path, out: Path, match: str, **kw) -> None:
    with pytest.raises(ConfigError, match=match):
        import_gguf(src, out, **kw)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_bad_inputs_are_refused_with_nothing_written(made, tmp_path, monkeypatch):
    _, g, _ = made["llama", "f32"]
    out = tmp_path / "out"
    (tmp_path / "notes.txt").write_text("not a model")
    refused(tmp_path / "notes.txt", out, "not a GGUF file")
    refused(tmp_path / "missing.gguf", out, "not found")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(g.read_bytes()[: g.stat().st_size // 2])
    refused(cut, out, "truncated")
    refused(write_gguf(tmp_path / "mamba.gguf", "mamba"), out, "architecture 'mamba'")
    refused(g, out, "--dtype 'int3'", dtype="int3")

    # a llama file whose ffn_down is IQ4_NL (made-up zero bytes): a type import does not read
    T, real_quantize = gguf.GGMLQuantizationType, gguf.quants.quantize
    iq4 = lambda name, shape, outtype, g: T.IQ4_NL if "ffn_down" in name else T.F32  # noqa: E731
    monkeypatch.setattr(export_mod, "tensor_type", iq4)
    monkeypatch.setattr(
        gguf.quants,
        "quantize",
        lambda a, q: (
            np.zeros((a.shape[0], a.shape[1] // 32 * 18), np.uint8)
            if q == T.IQ4_NL
            else real_quantize(a, q)
        ),
    )
    bad = export_gguf(made["llama", "f32"][0], tmp_path / "iq4.gguf", outtype="f32")
    refused(bad, out, "blk.0.ffn_down.weight has type IQ4_NL")

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists"):
        import_gguf(g, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cli_import(made, tmp_path):
    _, g, _ = made["qwen2", "q8_0"]
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "lmforge", "import", *map(str, a)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    ok = run(g, tmp_path / "hf")
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    again = run(g, tmp_path / "hf")
    assert again.returncode != 0 and "already exists" in again.stderr
    assert "Traceback" not in again.stderr


def test_pre_tokenizer_names_use_llama_cpps_splits(tmp_path):
    """Made-up metadata: a byte-level vocabulary of single characters and one merge "1 2"."""
    import tokenizers as tk

    from lmforge.model.gguf_import import build_tokenizer

    chars = sorted(tk.pre_tokenizers.ByteLevel.alphabet())
    meta = {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": [*chars, "12", "<|end|>"],
        "tokenizer.ggml.token_type": [1] * len(chars) + [1, 3],
        "tokenizer.ggml.merges": ["1 2"],
        "tokenizer.ggml.eos_token_id": len(chars) + 1,
        "tokenizer.ggml.bos_token_id": len(chars) + 1,
    }

    def pieces(pre: str, text: str) -> list[str]:
        spec, config = build_tokenizer(meta | {"tokenizer.ggml.pre": pre}, tmp_path)
        tok = tk.Tokenizer.from_str(spec)
        assert config["eos_token"] == "<|end|>"
        # no add_bos_token in the file: llama.cpp's default, BOS for llama-bpe only
        assert config["add_bos_token"] == (pre == "llama-bpe")
        assert (tok.encode(text).tokens[0] == "<|end|>") == (pre == "llama-bpe")  # the BOS here
        return tok.encode(text, add_special_tokens=False).tokens

    assert pieces("smollm", "a12<|end|>") == ["a", "1", "2", "<|end|>"]  # digits one by one
    assert pieces("gpt-2", "a12") == ["a", "12"]
    assert pieces("qwen2", "a12") == ["a", "1", "2"]
    assert pieces("llama-bpe", "a12 1234") == ["a", "12", "Ġ", "12", "3", "4"]  # 123 | 4
    assert pieces("default", "a12") == ["a", "12"]
    with pytest.raises(ConfigError, match="tokenizer.ggml.pre 'tekken' is not supported"):
        build_tokenizer(meta | {"tokenizer.ggml.pre": "tekken"}, tmp_path)
    with pytest.raises(ConfigError, match="tokenizer.ggml.model 'llama' is not supported"):
        build_tokenizer(meta | {"tokenizer.ggml.model": "llama"}, tmp_path)
    no_bos = {k: v for k, v in meta.items() if k != "tokenizer.ggml.bos_token_id"}
    with pytest.raises(ConfigError, match="bos_token_id is missing"):
        build_tokenizer(no_bos | {"tokenizer.ggml.pre": "llama-bpe"}, tmp_path)
    with pytest.raises(ConfigError, match="258 tokens but token_embd.weight has 100 rows"):
        build_tokenizer(meta, tmp_path, vocab_size=100)


@pytest.mark.parametrize("change", ["extra", "missing", "shape"])
def test_tensor_set_must_match_the_metadata(made, tmp_path, monkeypatch, change):
    """Files made by our exporter with a tensor added (Llama 3.1's rope_freqs), one left out, or
    one of another shape: refused before anything is written."""
    real = export_mod.gguf_tensors

    def edited(sd, cfg):
        for name, t in real(sd, cfg):
            if change == "missing" and name == "blk.1.ffn_up.weight":
                continue
            yield name, t[:, :-1] if change == "shape" and name == "blk.1.ffn_up.weight" else t
        if change == "extra":
            yield "rope_freqs.weight", torch.ones(8)

    monkeypatch.setattr(export_mod, "gguf_tensors", edited)
    g = export_gguf(made["llama", "f32"][0], tmp_path / "edited.gguf")
    match = {
        "extra": "'rope_freqs.weight' has no Hugging Face counterpart",
        "missing": "missing for model.layers.1.mlp.up_proj.weight",
        "shape": r"blk.1.ffn_up.weight has shape \(192, 63\), the metadata implies \(192, 64\)",
    }[change]
    refused(g, tmp_path / "out", match)
