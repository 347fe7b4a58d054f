"""GGUF export: one file holding the weights, the hyperparameters, the tokenizer and the chat
template, which llama.cpp (and what is built on it: llama-cpp-python, Ollama, LM Studio) opens.

The one idea: llama.cpp's `llama` graph rotates RoPE pairs of adjacent values (2i, 2i+1), while
our model, like HF's, rotates pairs (i, i + D/2) (rotate_half, "NeoX" style). Reordering the rows
of every q and k head so that row i + D/2 sits right after row i makes the two compute the same
thing: each pair gets the same frequency, and q.k is unchanged when q and k are permuted alike.
llama.cpp's convert_hf_to_gguf.py does the same for LlamaForCausalLM and MistralForCausalLM (both
become `llama`). Its `qwen2` graph rotates NeoX-style, so Qwen2 is written unpermuted; GPT-2 has
no RoPE. Everything else is renaming: llama.cpp keeps q/k/v and gate/up as separate tensors, so
our fused `wqkv` and `w13` are split (GPT-2 keeps its fused `attn_qkv`). Mixtral is `llama` with
`expert_count` set and its experts stacked as ours are (`ffn_gate_exps`, (E, F, dim)); Qwen2-MoE
is `qwen2moe`, the same plus its shared expert (`ffn_*_shexp`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from lmforge.config import ConfigError, ModelConfig
from lmforge.io import read_json
from lmforge.model.checkpoint import load_config, load_model
from lmforge.tokenizer import SPLIT_PATTERN, Tokenizer

OUTTYPES = ("f32", "f16", "q8_0")

# our family -> llama.cpp's architecture (Mistral is Llama to llama.cpp, minus the sliding window)
GGUF_ARCH = {
    "llama": "llama",
    "mistral": "llama",
    "mixtral": "llama",  # llama with experts, as llama.cpp's converter writes Mixtral
    "qwen2": "qwen2",
    "qwen2_moe": "qwen2moe",
    "gpt2": "gpt2",
}

# per-layer tensors that only change name: ours -> llama.cpp's (`blk.{i}.` prefixed)
LLAMA_LAYER = {
    "attn_norm.weight": "attn_norm.weight",
    "attn.wo.weight": "attn_output.weight",
    "mlp_norm.weight": "ffn_norm.weight",
    "mlp.w2.weight": "ffn_down.weight",
}
GPT2_LAYER = {
    "attn_norm": "attn_norm",
    "attn.wqkv": "attn_qkv",  # fused in both: rows q, then k, then v
    "attn.wo": "attn_output",
    "mlp_norm": "ffn_norm",
    "mlp.w1": "ffn_up",
    "mlp.w2": "ffn_down",
}

# The pre-tokenizer regex of a tokenizer.json -> the llama.cpp pre-tokenizer type (written as
# `tokenizer.ggml.pre`) whose built-in regex splits text the same way. llama.cpp cannot read a
# regex from the file: it only knows its own list, so the match has to be made here.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
    # Ours is GPT-4's cl100k split with Han runs (at most 16 characters) cut out of the letter
    # rule. llama.cpp has no Han-aware type with that rule; the closest is the cl100k regex, which
    # its "dbrx" type uses (DBRX's tokenizer is cl100k) with nothing else switched on. "llama-bpe"
    # has the same regex but also turns on `ignore_merges` (a word found whole in the vocabulary
    # skips BPE), which our tokenizer does not do. The splits differ where Han touches a non-Han
    # letter (we cut, cl100k does not; no merge crosses that boundary, so the tokens come out the
    # same) and in Han runs longer than 16 characters, which cl100k keeps whole, so BPE may merge
    # across our cut ("不|同" -> "不同"). That is common in Chinese prose: in
    # benchmarks/gguf_llamacpp.py 33 of 50 zhwiki documents differ somewhere, by about 0.1% of
    # their tokens, every difference of that kind; English tokenizes identically.
    SPLIT_PATTERN: "dbrx",
    LLAMA3_PATTERN: "llama-bpe",
    QWEN2_PATTERN: "qwen2",
}


def export_gguf(checkpoint: str | Path, out_path: str | Path, outtype: str = "f32") -> Path:
    """Write the model directory `checkpoint` (ours or a HF one of a supported family) as one GGUF
    file at out_path, which must not exist. outtype f32 keeps every tensor fp32; f16 and q8_0
    convert the 2-D weight matrices (q8_0: those whose rows are whole 32-value blocks, the others
    f16, as llama.cpp's converter does); norms, biases and position tables stay fp32."""
    try:
        import gguf
    except ImportError:
        raise ConfigError(
            "GGUF export needs the gguf package: pip install 'lmforge[gguf]'"
        ) from None
    ckpt, out = Path(checkpoint), Path(out_path)
    if outtype not in OUTTYPES:
        raise ConfigError(f"GGUF outtype {outtype!r} is not supported; choose one of {OUTTYPES}")
    if out.exists():
        raise ConfigError(f"{out} already exists; remove it or choose another output path")
    cfg = _check_source(ckpt)
    arch = GGUF_ARCH[cfg.arch]
    if cfg.arch in ("qwen2", "qwen2_moe") and cfg.n_head * cfg.head_dim != cfg.dim:
        raise ConfigError(
            f"checkpoint {ckpt}: llama.cpp's qwen2 needs n_head * head_dim = dim "
            f"({cfg.n_head} * {cfg.head_dim} != {cfg.dim})"
        )
    model = load_model(ckpt)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        _add_hparams(writer, cfg, _model_name(ckpt), outtype, gguf)
        _add_tokenizer(writer, ckpt, cfg, gguf)
        for name, t in gguf_tensors(model.state_dict(), cfg):
            qtype = tensor_type(name, tuple(t.shape), outtype, gguf)
            data = t.detach().float().cpu().contiguous().numpy()
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def _check_source(ckpt: Path) -> ModelConfig:
    """The checkpoint's config, refusing (with the reason) what is not a float model directory."""
    if not ckpt.is_dir():
        raise ConfigError(f"checkpoint directory not found: {ckpt}")
    if (ckpt / "adapter_config.json").is_file():
        raise ConfigError(
            f"{ckpt} is a LoRA adapter, not a model: merge it first with "
            f"`lmforge export {ckpt} MERGED_DIR --merge-lora`, then export MERGED_DIR"
        )
    cfg = load_config(ckpt)  # a missing or broken config.json is reported here
    if cfg.arch == "qwen2_moe" and cfg.norm_topk:  # llama.cpp's qwen2moe graph never does
        raise ConfigError(
            f"checkpoint {ckpt}: llama.cpp's qwen2moe uses the top-k router weights as they are; "
            "this model renormalises them (norm_topk_prob true), so it would compute differently"
        )
    if cfg.arch not in GGUF_ARCH:
        raise ConfigError(
            f"checkpoint {ckpt}: GGUF export does not write {cfg.arch} models yet; it writes "
            f"{', '.join(GGUF_ARCH)}"
        )
    if read_json(ckpt / "config.json").get("quantization_config"):
        raise ConfigError(
            f"{ckpt / 'config.json'} has a quantization_config: this is a quantized checkpoint; "
            "export the float model it was made from (GGUF's own q8_0 is --outtype q8_0)"
        )
    if cfg.rope_scaling:  # we write only rope.freq_base: llama.cpp would rotate without scaling
        raise ConfigError(
            f"checkpoint {ckpt}: GGUF export does not write rope_scaling "
            f"({cfg.rope_scaling}) yet; llama.cpp would compute different logits"
        )
    return cfg


def _model_name(ckpt: Path) -> str:
    """general.name: the directory name, or `<run>-<stage>` for lmforge's <run>/<stage>/model."""
    parts = ckpt.resolve().parts
    return f"{parts[-3]}-{parts[-2]}" if parts[-1] == "model" and len(parts) >= 3 else parts[-1]


# --------------------------------------------------------------------------- tensors


def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of each head reordered from halves (0..D/2-1, D/2..D-1) to pairs (0, D/2, 1, D/2+1,
    ...): HF's rotate_half RoPE becomes llama.cpp's adjacent-pair RoPE. Works on weights (rows,
    in) and biases (rows,)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(
    sd: dict[str, torch.Tensor], cfg: ModelConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """Our state dict -> (llama.cpp name, tensor) in llama.cpp's layout for cfg.arch. With tied
    embeddings there is no `output.weight`: llama.cpp then reads `token_embd.weight` for both."""
    yield "token_embd.weight", sd["tok_emb.weight"]
    if cfg.arch == "gpt2":
        yield "position_embd.weight", sd["pos_emb.weight"]
    for kind in ("weight", "bias") if cfg.bias else ("weight",):
        yield f"output_norm.{kind}", sd[f"norm.{kind}"]
    if not cfg.tie_embeddings:
        yield "output.weight", sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        p, g = f"layers.{i}.", f"blk.{i}."
        if cfg.arch == "gpt2":
            for ours, theirs in GPT2_LAYER.items():
                for kind in ("weight", "bias"):
                    yield g + f"{theirs}.{kind}", sd[p + f"{ours}.{kind}"]
            continue
        q_rows, kv_rows = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
        for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            q, k, v = sd[p + f"attn.wqkv.{kind}"].split([q_rows, kv_rows, kv_rows], dim=0)
            if GGUF_ARCH[cfg.arch] == "llama":  # adjacent-pair RoPE: see the module docstring
                q, k = permute_rope(q, cfg.n_head), permute_rope(k, cfg.n_kv_head)
            yield from ((g + f"attn_{n}.{kind}", t) for n, t in zip("qkv", (q, k, v)))
        if cfg.mlp == "moe":
            yield from _moe_tensors(sd, p, g, cfg)
        else:
            gate, up = sd[p + "mlp.w13.weight"].chunk(2, dim=0)
            yield g + "ffn_gate.weight", gate
            yield g + "ffn_up.weight", up
        for ours, theirs in LLAMA_LAYER.items():
            if cfg.mlp != "moe" or ours != "mlp.w2.weight":  # experts: ffn_down_exps
                yield g + theirs, sd[p + ours]


def _moe_tensors(sd: dict, p: str, g: str, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """A layer's router and stacked experts, llama.cpp's `*_exps` (E, rows, in); Qwen2-MoE's
    shared expert and its gate (a vector: llama.cpp reads it as (dim,))."""
    gate, up = sd[p + "mlp.w13"].chunk(2, dim=1)  # (E, 2F, dim) -> two (E, F, dim)
    yield g + "ffn_gate_inp.weight", sd[p + "mlp.router.weight"]  # (E, dim)
    yield g + "ffn_gate_exps.weight", gate
    yield g + "ffn_up_exps.weight", up
    yield g + "ffn_down_exps.weight", sd[p + "mlp.w2"]  # (E, dim, F)
    if cfg.shared_expert_dim:
        gate, up = sd[p + "mlp.shared_w13.weight"].chunk(2, dim=0)
        yield g + "ffn_gate_inp_shexp.weight", sd[p + "mlp.shared_gate.weight"].reshape(-1)
        yield g + "ffn_gate_shexp.weight", gate
        yield g + "ffn_up_shexp.weight", up
        yield g + "ffn_down_shexp.weight", sd[p + "mlp.shared_w2.weight"]


def tensor_type(name: str, shape: tuple[int, ...], outtype: str, gguf):
    """The GGML type a tensor is stored as. The rules are llama.cpp's converter's: 1-D tensors,
    norms and position tables stay F32 (llama.cpp's kernels expect them so); q8_0 quantizes rows
    in blocks of 32 values, so a matrix whose rows are not whole blocks falls back to F16."""
    T = gguf.GGMLQuantizationType
    if outtype == "f32" or len(shape) < 2 or "norm" in name or name.startswith("position_embd"):
        return T.F32
    if "ffn_gate_inp" in name:  # a router stays F32, as llama.cpp's converter keeps it
        return T.F32
    if outtype == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[T.Q8_0][0] == 0:
        return T.Q8_0
    return T.F16


# --------------------------------------------------------------------------- metadata


def _add_hparams(writer, cfg: ModelConfig, name: str, outtype: str, gguf) -> None:
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[outtype]
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # llama.cpp's llama graph has no sliding window: a Mistral model computes the same only up to
    # the window, so that is the context the file announces
    ctx = min(cfg.max_seq_len, cfg.sliding_window) if cfg.sliding_window else cfg.max_seq_len
    writer.add_context_length(ctx)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.ffn_dim)
    if cfg.mlp == "moe":
        writer.add_expert_count(cfg.n_experts)
        writer.add_expert_used_count(cfg.experts_per_token)
    if cfg.arch == "qwen2_moe":  # the experts' widths, apart from the (unused) dense one
        writer.add_expert_feed_forward_length(cfg.ffn_dim)
        writer.add_expert_shared_feed_forward_length(cfg.shared_expert_dim)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_kv_head)
    writer.add_vocab_size(cfg.vocab_size)
    if cfg.norm == "layernorm":
        writer.add_layer_norm_eps(cfg.norm_eps)
    else:
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
    if cfg.pos == "rope":
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_rope_dimension_count(cfg.head_dim)  # every dimension of a head rotates
        writer.add_key_length(cfg.head_dim)  # llama.cpp assumes dim / n_head without these
        writer.add_value_length(cfg.head_dim)


def _add_tokenizer(writer, ckpt: Path, cfg: ModelConfig, gguf) -> None:
    """Vocabulary, merges, special ids and chat template, as llama.cpp's BPE ("gpt2") reads them."""
    file = ckpt / "tokenizer.json"
    if not file.is_file():
        raise ConfigError(f"checkpoint {ckpt} has no tokenizer.json: GGUF needs the tokenizer")
    spec = json.loads(file.read_text(encoding="utf-8"))
    tok = Tokenizer.load(ckpt)  # bos/eos/pad and the chat template, with their fallbacks
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ConfigError(
            f"{file}: only byte-level BPE tokenizers (GPT-2 style) can be exported to GGUF"
        )
    # ids -> token strings, in the byte-to-unicode alphabet llama.cpp's BPE vocabulary expects
    tokens: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    special = {a["id"]: a["special"] for a in spec.get("added_tokens", [])}
    tokens.update({a["id"]: a["content"] for a in spec.get("added_tokens", [])})
    n_tok = max(tokens) + 1
    if sorted(tokens) != list(range(n_tok)):
        raise ConfigError(f"{file}: token ids are not contiguous from 0")
    if n_tok > cfg.vocab_size:
        raise ConfigError(
            f"{file} has {n_tok} tokens but the model's vocab_size is {cfg.vocab_size}"
        )
    TT = gguf.TokenType
    types = [
        TT.NORMAL if i not in special else TT.CONTROL if special[i] else TT.USER_DEFINED
        for i in range(n_tok)
    ]
    # embedding rows past the tokenizer (vocab padded to a round size): named, never produced
    names = [tokens[i] for i in range(n_tok)] + [f"[PAD{i}]" for i in range(n_tok, cfg.vocab_size)]
    types += [TT.UNUSED] * (cfg.vocab_size - n_tok)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(spec, file))
    writer.add_token_list(names)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tok.bos_id)
    writer.add_eos_token_id(tok.eos_id)
    writer.add_pad_token_id(tok.pad_id)
    if model.get("unk_token") in model["vocab"]:
        writer.add_unk_token_id(model["vocab"][model["unk_token"]])
    writer.add_add_bos_token(tok.prepend_bos)  # lmforge starts every sequence with BOS
    writer.add_add_eos_token(False)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def _pre_tokenizer(spec: dict, file: Path) -> str:
    """The llama.cpp pre-tokenizer type that splits text as tokenizer.json's pre_tokenizer does."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    splits = [s for s in steps if s.get("type") == "Split"]
    if not splits and any(s.get("type") == "ByteLevel" and s.get("use_regex") for s in steps):
        return "gpt-2"  # GPT-2's own regex, built into ByteLevel
    patterns = [s.get("pattern", {}).get("Regex") for s in splits]
    pattern = patterns[0] if len(patterns) == 1 else None
    name = PRE_TOKENIZERS.get(pattern)
    if name is None:
        # a tokenizer `lmforge import` rebuilt from a GGUF holds llama.cpp's own splits of the
        # file's type (SmolLM2: digits, then GPT-2's regex): give the type back
        from lmforge.model.gguf_import import PRE_SPLITS

        name = next((n for n, splits in PRE_SPLITS.items() if splits == patterns), None)
    if name in ("llama-bpe", "llama3") and not (spec.get("model") or {}).get("ignore_merges"):
        name = "dbrx"  # the same regex without llama-bpe's ignore_merges
    if name is None:
        raise ConfigError(
            f"{file}: llama.cpp has no pre-tokenizer type for this split regex "
            f"({pattern if len(patterns) == 1 else patterns!r}); it would tokenize text "
            "differently from this tokenizer"
        )
    return name
