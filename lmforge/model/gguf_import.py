"""GGUF import: one llama.cpp file (weights, hyperparameters, tokenizer, chat template) back into a
Hugging Face model directory that lmforge and transformers both open.

The one idea: undo what a GGUF converter did, tensor by tensor. Each tensor is dequantized on its
own (so a quantized file never sits in memory as floats all at once), renamed to its HF name, and
for llama.cpp's `llama` graph the rows of every q and k head go back from adjacent RoPE pairs to
halves (the inverse of compress/gguf.py's `permute_rope`; `qwen2` is stored unpermuted). The
tokenizer is rebuilt from `tokenizer.ggml.*`: a byte-level BPE whose split regexes are the ones
llama.cpp uses for the file's `tokenizer.ggml.pre` name (llama.cpp ignores any regex a
tokenizer.json had, so these are what the file's tokens were produced with). A `llama` file with
`expert_count` is a Mixtral: its stacked experts (`ffn_gate_exps`, (E, F, dim)) are split into
the per-expert HF tensors; a `qwen2moe` file is a Qwen2-MoE (with its shared expert).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from lmforge.config import ARCH_FEATURES, ConfigError, ModelConfig
from lmforge.io import atomic_dir, write_json
from lmforge.model.checkpoint import stop_token_ids
from lmforge.model.hf import to_hf_config, to_hf_state_dict
from lmforge.model.transformer import GPT

# llama.cpp architecture names we read (Mistral files say "llama"; with experts it is Mixtral)
ARCHS = ("llama", "qwen2", "qwen2moe")
DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
# GGML types we dequantize (gguf.quants.dequantize does the math): floats, the legacy block
# quants and the K-quants
TENSOR_TYPES = "F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q2_K Q3_K Q4_K Q5_K Q6_K".split()

# llama.cpp name -> HF name (blk.{i}. -> model.layers.{i}.)
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "block_sparse_moe.gate",  # a Mixtral layer's router
}
# a Mixtral layer's stacked experts -> each expert's HF name ({e}: the expert)
EXPERT_NAMES = {
    "ffn_gate_exps": "block_sparse_moe.experts.{e}.w1",
    "ffn_up_exps": "block_sparse_moe.experts.{e}.w3",
    "ffn_down_exps": "block_sparse_moe.experts.{e}.w2",
}
# a Qwen2-MoE layer's router, experts and shared expert
QWEN2_MOE_NAMES = {
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.{e}.gate_proj",
    "ffn_up_exps": "mlp.experts.{e}.up_proj",
    "ffn_down_exps": "mlp.experts.{e}.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",  # a vector (dim,) in the file, HF's (1, dim)
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}

# tokenizer.ggml.pre -> llama.cpp's split regexes (llama-vocab.cpp), applied one after another
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_SPLITS = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]"],
    "gpt-2": [GPT2_SPLIT],
    "smollm": [r"\p{N}", GPT2_SPLIT],
    "starcoder": [r"\p{N}", GPT2_SPLIT],
    "llama-bpe": [LLAMA3_SPLIT],
    "llama3": [LLAMA3_SPLIT],
    "dbrx": [LLAMA3_SPLIT],
    "smaug-bpe": [LLAMA3_SPLIT],
    "qwen2": [QWEN2_SPLIT],
    "deepseek-r1-qwen": [QWEN2_SPLIT],
}
# for these llama.cpp also looks a whole word up in the vocabulary before BPE (ignore_merges)
# and adds BOS when the file does not say (tokenizer.ggml.add_bos_token); the others add none
LLAMA3_PRE = ("llama-bpe", "llama3")
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


def import_gguf(src: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Write the GGUF file `src` as a HF model directory `out` (which must not exist):
    config.json, model.safetensors (dtype float32 or bf16), tokenizer files,
    generation_config.json and provenance.json. Returns out. Nothing is left at `out` on error."""
    gguf = _gguf()
    src, out = Path(src), Path(out)
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not supported; choose float32 or bf16")
    if out.exists():
        raise ConfigError(f"{out} already exists; remove it or choose another output directory")
    reader = open_gguf(src, gguf)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    cfg = model_config(meta, reader, src)
    check_tensors(reader, cfg, src)  # before anything is written: every tensor known and fits
    tok_spec, tok_config = build_tokenizer(meta, src, cfg.vocab_size)
    with atomic_dir(out) as tmp:
        tensors = hf_tensors(reader, cfg, gguf, DTYPES[dtype], src)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        pad = meta.get("tokenizer.ggml.padding_token_id")
        torch_dtype = str(DTYPES[dtype]).removeprefix("torch.")
        write_json(
            tmp / "config.json", to_hf_config(cfg, pad_token_id=pad, torch_dtype=torch_dtype)
        )
        (tmp / "tokenizer.json").write_text(tok_spec, encoding="utf-8")
        write_json(tmp / "tokenizer_config.json", tok_config)
        write_json(tmp / "generation_config.json", generation_config(cfg, pad, tmp))
        write_json(tmp / "provenance.json", provenance(src, meta, reader))
    return out


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConfigError(
            "GGUF import needs the gguf package: pip install 'lmforge[gguf]'"
        ) from None
    return gguf


def open_gguf(src: Path, gguf):
    """A GGUFReader over src, refusing a missing, non-GGUF or truncated file by name."""
    if not src.is_file():
        raise ConfigError(f"GGUF file not found: {src}")
    with src.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ConfigError(f"{src} is not a GGUF file (it does not start with 'GGUF')")
    try:
        reader = gguf.GGUFReader(src)
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors, ...
        raise ConfigError(f"{src} is not a readable GGUF file (truncated?): {e}") from None
    size = src.stat().st_size
    for t in reader.tensors:  # memmap would hand back short arrays, not an error
        if int(t.data_offset) + int(t.n_bytes) > size:
            raise ConfigError(
                f"{src} is truncated: tensor {t.name} ends at byte "
                f"{int(t.data_offset) + int(t.n_bytes)}, the file has {size}"
            )
    return reader


# --------------------------------------------------------------------------- config


def model_config(meta: dict, reader, src: Path) -> ModelConfig:
    """Our ModelConfig from `{arch}.*` metadata; what we would compute differently is refused."""
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise ConfigError(
            f"{src}: general.architecture {arch!r} is not supported; supported: {', '.join(ARCHS)}"
        )

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ConfigError(f"{src}: metadata {arch}.{key} is missing")
        return value

    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise ConfigError(f"{src}: {arch}.rope.scaling.type={scaling!r} is not supported")
    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names or len(names["token_embd.weight"].shape) != 2:
        raise ConfigError(f"{src}: tensor token_embd.weight is missing or not a matrix")
    dim, n_head = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", dim // n_head))
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise ConfigError(f"{src}: partial RoPE ({arch}.rope.dimension_count) is not supported")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    if eos is None:
        raise ConfigError(f"{src}: tokenizer.ggml.eos_token_id is missing")
    ours, moe = {"qwen2moe": "qwen2_moe"}.get(arch, arch), {}
    # Qwen2-MoE's experts have their own width (feed_forward_length is its dense layers')
    ffn = get("expert_feed_forward_length" if arch == "qwen2moe" else "feed_forward_length")
    if int(meta.get(f"{arch}.expert_count", 0)):  # llama with experts: Mixtral
        if arch == "qwen2":
            raise ConfigError(f"{src}: experts in a qwen2 file are not supported")
        ours = "mixtral" if arch == "llama" else ours
        moe = dict(
            n_experts=int(get("expert_count")), experts_per_token=int(get("expert_used_count"))
        )
    if arch == "qwen2moe":  # llama.cpp's qwen2moe: the routed weights as they are
        shared = names.get("blk.0.ffn_gate_shexp.weight")
        moe |= dict(norm_topk=False, shared_expert_dim=int(
            get("expert_shared_feed_forward_length", shared.shape[1] if shared else 0)
        ))  # fmt: skip
    return ModelConfig(
        arch=ours,
        **ARCH_FEATURES[ours],
        **moe,
        vocab_size=int(names["token_embd.weight"].shape[1]),  # GGUF shapes are (in, out)
        dim=dim,
        n_layer=int(get("block_count")),
        n_head=n_head,
        n_kv_head=int(get("attention.head_count_kv", n_head)),
        head_dim=head_dim,
        ffn_dim=int(ffn),
        max_seq_len=int(get("context_length")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in names,
        bos_token_id=int(meta.get("tokenizer.ggml.bos_token_id", eos)),
        eos_token_id=int(eos),
    )


def generation_config(cfg: ModelConfig, pad: int | None, tok_dir: Path) -> dict:
    """The same generation_config.json save_model writes (stop at EOS and <|im_end|>)."""
    return {
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": stop_token_ids(cfg, tok_dir),
        "pad_token_id": pad,
        "do_sample": True,
        "temperature": 0.8,
        "top_p": 0.95,
        "max_length": cfg.max_seq_len,
    }


def provenance(src: Path, meta: dict, reader) -> dict:
    """Where the weights came from: the file, its sha256 and what its metadata says of itself."""
    digest = hashlib.sha256()
    with src.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    general = {k: v for k, v in meta.items() if k.startswith("general.")}
    return {
        "source": str(src.resolve()),
        "sha256": digest.hexdigest(),
        "bytes": src.stat().st_size,
        "license": meta.get("general.license"),
        "general": general,
        "tensor_types": types,
        "converted_by": "lmforge import",
    }


# --------------------------------------------------------------------------- tensors


def unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of compress/gguf.py's permute_rope: per head, rows (0, D/2, 1, D/2+1, ...) back to
    (0..D/2-1, D/2..D-1), llama.cpp's adjacent-pair RoPE back to HF's rotate_half."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def hf_name(name: str, src: Path, arch: str = "llama") -> str:
    """The HF tensor name of a llama.cpp one in our `arch`; an unknown tensor is refused (we
    would drop it)."""
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    layer = LAYER_NAMES | (QWEN2_MOE_NAMES if arch == "qwen2_moe" else EXPERT_NAMES)
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in layer:
        return f"model.layers.{parts[1]}.{layer[parts[2]]}.{parts[3]}"
    raise ConfigError(f"{src}: tensor {name!r} has no Hugging Face counterpart we know")


def hf_shape(t) -> tuple[int, ...]:
    """A GGUF tensor's shape in torch order (GGUF lists dimensions innermost first); the shared
    expert's gate, a vector in the file, is a (1, dim) matrix to HF."""
    shape = tuple(int(n) for n in reversed(t.shape))
    return (1, *shape) if ".ffn_gate_inp_shexp." in t.name else shape


def check_tensors(reader, cfg: ModelConfig, src: Path) -> None:
    """Every tensor has an HF name, a type we read and the shape cfg implies; none is missing.
    The expected set comes from a GPT built on the meta device (no memory) through hf.py."""
    with torch.device("meta"):
        model = GPT(cfg)
    want = {k: tuple(v.shape) for k, v in to_hf_state_dict(model.state_dict(), cfg).items()}
    seen = set()
    for t in reader.tensors:
        if t.tensor_type.name not in TENSOR_TYPES:
            raise ConfigError(
                f"{src}: tensor {t.name} has type {t.tensor_type.name}, which import does not "
                f"read; supported: {', '.join(TENSOR_TYPES)}"
            )
        name, shape = hf_name(t.name, src, cfg.arch), hf_shape(t)
        if "{e}" in name:  # stacked experts (n_experts, rows, in): one HF matrix per expert
            names = [name.format(e=e) for e in range(cfg.n_experts)]
            ok = shape[0] == cfg.n_experts and all(want.get(n) == shape[1:] for n in names)
            implied = (cfg.n_experts, *want.get(names[0], ()))
        else:
            names, ok, implied = [name], want.get(name) == shape, want.get(name, "no such tensor")
        if not ok:
            raise ConfigError(
                f"{src}: tensor {t.name} has shape {shape}, the metadata implies {implied}"
            )
        seen.update(names)
    missing = sorted(set(want) - seen)
    if missing:
        raise ConfigError(f"{src}: tensors missing for {', '.join(missing[:5])}")


def read_tensor(t, gguf) -> torch.Tensor:
    """One tensor as float32 in HF's (out, in) layout, dequantized by gguf.quants."""
    data = gguf.quants.dequantize(t.data, t.tensor_type)
    return torch.from_numpy(np.array(data, dtype=np.float32).reshape(hf_shape(t)))


def hf_tensors(reader, cfg: ModelConfig, gguf, dtype: torch.dtype, src: Path) -> dict:
    """{HF name: tensor} of every tensor in the file, one dequantized at a time."""
    out = {}
    for t in tqdm(reader.tensors, desc="import", unit="tensor", dynamic_ncols=True):
        w = read_tensor(t, gguf)
        if cfg.arch in ("llama", "mixtral") and (".attn_q." in t.name or ".attn_k." in t.name):
            w = unpermute_rope(w, cfg.n_head if ".attn_q." in t.name else cfg.n_kv_head)
        name = hf_name(t.name, src, cfg.arch)
        if "{e}" in name:  # stacked experts (E, rows, in): one HF matrix each
            out |= {name.format(e=e): we.to(dtype).contiguous() for e, we in enumerate(w)}
        else:
            out[name] = w.to(dtype).contiguous()
    return out


# --------------------------------------------------------------------------- tokenizer


def build_tokenizer(meta: dict, src: Path, vocab_size: int | None = None) -> tuple[str, dict]:
    """(tokenizer.json text, tokenizer_config.json) from tokenizer.ggml.*: byte-level BPE with
    llama.cpp's split for the file's pre-tokenizer name, control tokens as special added tokens,
    user-defined ones as plain added tokens, BOS prepended when the file says llama.cpp adds it."""
    import tokenizers as tk

    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ConfigError(
            f"{src}: tokenizer.ggml.model {model!r} is not supported; only byte-level BPE "
            "('gpt2': GPT-2, Llama 3, Qwen2, SmolLM) is"
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_SPLITS:
        raise ConfigError(
            f"{src}: tokenizer.ggml.pre {pre!r} is not supported; supported: "
            f"{', '.join(PRE_SPLITS)}"
        )
    tokens = list(meta.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise ConfigError(f"{src}: tokenizer.ggml.tokens is missing")
    if vocab_size is not None and len(tokens) > vocab_size:
        raise ConfigError(
            f"{src}: {len(tokens)} tokens but token_embd.weight has {vocab_size} rows"
        )
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a repeated string keeps its first id, as llama.cpp's lookup does
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in LLAMA3_PRE))
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence(
        [tk.pre_tokenizers.Split(tk.Regex(r), behavior="isolated") for r in PRE_SPLITS[pre]]
        + [tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = tk.decoders.ByteLevel()
    added = [
        tk.AddedToken(t, special=ty == CONTROL, normalized=False)
        for t, ty in zip(tokens, types)
        if ty in (CONTROL, USER_DEFINED)
    ]
    tok.add_special_tokens([a for a in added if a.special])
    tok.add_tokens([a for a in added if not a.special])

    def name(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and int(i) < len(tokens) else None

    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", pre in LLAMA3_PRE))
    bos = name("bos") if add_bos else None  # lmforge prepends BOS exactly when one is named
    if add_bos and bos is None:
        raise ConfigError(
            f"{src}: llama.cpp adds BOS here (tokenizer.ggml.add_bos_token, or its default for "
            f"pre-tokenizer {pre!r}) but tokenizer.ggml.bos_token_id is missing"
        )
    if bos is not None:
        tok.post_processor = tk.processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, vocab[bos])],
        )
    specials = [a.content for a in added if a.special]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": name("eos"),
        "pad_token": name("padding"),
        "unk_token": name("unknown"),
        "additional_special_tokens": [
            t for t in specials if t not in (bos, name("eos"), name("padding"))
        ],
        "model_max_length": int(
            meta.get(f"{meta.get('general.architecture')}.context_length", 2048)
        ),
        "add_bos_token": add_bos,
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        **(
            {"chat_template": meta["tokenizer.chat_template"]}
            if "tokenizer.chat_template" in meta
            else {}
        ),
    }
    return tok.to_str(pretty=True), config
