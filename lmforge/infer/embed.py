"""Sentence embeddings: a text -> one unit vector, from an encoder or from a causal model.

The one idea: an embedding is a pooled, normalised hidden state. For a sentence-transformers
directory (all-MiniLM-L6-v2) the directory says how: `1_Pooling/config.json` names the pooling
(mean over the attention mask there) and `modules.json` a final Normalize; the tokenizer adds
[CLS] ... [SEP] and truncates to `sentence_bert_config.json`'s max_seq_length, as
sentence-transformers does, so the vectors match its `encode`. A causal lmforge model (or one
imported from HF / GGUF) has no such files: its final normed hidden states are pooled by `mean`
(default) or `last` (the last real token, the only one that has read the whole text under a
causal mask) and always L2-normalised, so a dot product is the cosine.

Batches are grouped by length (texts sorted by token count, padded to the longest in their
batch), which wastes little on padding; the rows come back in the caller's order. Padding is on
the right: the encoder masks it out of attention, and a causal model's real tokens never see it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.config import ConfigError
from lmforge.model.bert import load_bert
from lmforge.model.load import load

POOLINGS = ("mean", "last", "cls")


def _read_json(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None


def sentence_transformers_pooling(path: Path) -> tuple[str, bool]:
    """(pooling, normalize) as a sentence-transformers directory states them; a bare BERT
    directory (no modules.json) gets mean pooling and normalisation, the common choice."""
    modules = _read_json(path / "modules.json") if (path / "modules.json").is_file() else []
    normalize = not modules or any(m.get("type", "").endswith(".Normalize") for m in modules)
    pooling = "mean"
    for m in modules:
        if m.get("type", "").endswith(".Pooling"):
            cfg = _read_json(path / m.get("path", "") / "config.json")
            modes = [k for k, on in cfg.items() if k.startswith("pooling_mode_") and on]
            named = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                     "pooling_mode_lasttoken": "last"}  # fmt: skip
            if len(modes) != 1 or modes[0] not in named:
                raise ConfigError(
                    f"{path / m.get('path', '')}/config.json: pooling {modes} is not supported "
                    f"(one of {sorted(named)})"
                )
            pooling = named[modes[0]]
    return pooling, normalize


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """hidden (B, T, dim), mask (B, T) 1 for real tokens (right-padded) -> (B, dim)."""
    if how == "cls":
        return hidden[:, 0]
    if how == "last":
        last = mask.sum(1) - 1  # (B,) index of the last real token
        return hidden[torch.arange(hidden.shape[0]), last]
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)  # the clamp: sentence-transformers'


class Embedder:
    """Embeds texts with the model in `path`: `embed(texts) -> (N, dim) float32`."""

    def __init__(self, path: str | Path, device: str = "cpu", pooling: str | None = None):
        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path} is not a model directory: config.json is missing")
        if pooling is not None and pooling not in POOLINGS:
            raise ConfigError(f"pooling {pooling!r} is not one of {POOLINGS}")
        self.path = path
        hf = _read_json(path / "config.json")
        if hf.get("model_type") == "bert":
            self._open_encoder(path, device, pooling)
        else:
            self._open_causal(path, device, pooling)

    def _open_encoder(self, path: Path, device: str, pooling: str | None) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.model = load_bert(path, device)
        self.kind = "encoder"
        stated, self.normalize = sentence_transformers_pooling(path)
        self.pooling = pooling or stated
        st = path / "sentence_bert_config.json"
        self.max_len = min(
            _read_json(st).get("max_seq_length", 512) if st.is_file() else 512,
            self.model.cfg.max_seq_len,
        )
        if not (path / "tokenizer.json").is_file():
            raise ConfigError(f"{path}: tokenizer.json is missing")
        self._tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=self.max_len)  # [CLS] and [SEP] included
        self.pad_id = self.model.cfg.pad_token_id

    def _open_causal(self, path: Path, device: str, pooling: str | None) -> None:
        self.model, self.tokenizer = load(path, device=device)
        self.kind = "causal"
        self.pooling = pooling or "mean"
        self.normalize = True
        self.max_len = self.model.cfg.max_seq_len
        self.pad_id = self.tokenizer.pad_id

    @property
    def dim(self) -> int:
        return self.model.cfg.dim

    @property
    def vocab_size(self) -> int:
        return self.model.cfg.vocab_size

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` alone, no [CLS]/[SEP] or BOS (what retrieval chunks by); capped at
        max_len for an encoder, which truncates."""
        if self.kind == "encoder":
            return len(self._tok.encode(text, add_special_tokens=False).ids)
        return len(self.tokenizer.encode(text))

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """The ids the model reads for each text (truncated to max_len): an encoder's with its
        [CLS] ... [SEP], a causal model's after its BOS."""
        if self.kind == "encoder":
            return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=True)]
        bos = [self.tokenizer.bos_id] if self.tokenizer.prepend_bos else []
        return [(bos + ids)[: self.max_len] for ids in self.tokenizer.encode_batch(list(texts))]

    def embed(self, texts: list[str], batch_size: int = 32, progress: Callable | None = None):
        """(N, dim) float32, row i for texts[i]."""
        if isinstance(texts, str):
            raise TypeError("embed takes a list of texts, not one string")
        return self.embed_ids(self.tokenize(texts), batch_size, progress)

    def embed_ids(self, seqs: list[list[int]], batch_size: int = 32, progress=None):
        """(N, dim) float32 for token-id sequences, read as given (no special tokens added)."""
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        for i, s in enumerate(seqs):
            if not 1 <= len(s) <= self.max_len:
                raise ConfigError(f"input {i} has {len(s)} tokens: 1 to {self.max_len} allowed")
        out = np.zeros((len(seqs), self.dim), dtype=np.float32)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # length-grouped batches
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            out[rows] = self._embed_batch([seqs[i] for i in rows])
            if progress is not None:
                progress(len(rows))
        return out

    @torch.inference_mode()
    def _embed_batch(self, seqs: list[list[int]]) -> np.ndarray:
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = torch.tensor(s)
            mask[b, : len(s)] = 1
        device = next(self.model.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        if self.kind == "encoder":
            hidden = self.model(ids, mask)  # (B, T, dim)
        else:
            hidden = self.model.features(ids)  # causal: padding on the right is never read
        vec = pool(hidden.float(), mask, self.pooling)
        if self.normalize:
            vec = F.normalize(vec, p=2, dim=1)
        return vec.cpu().numpy()


# --- files: `lmforge embed`


def read_rows(path: str | Path, field: str = "text", id_field: str = "id"):
    """(texts, ids) of a JSONL file; a row without `id_field` gets its line number as id. A bad
    line is a ConfigError naming the file and the line."""
    path = Path(path)
    texts, ids = [], []
    try:
        f = path.open(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            text = row.get(field) if isinstance(row, dict) else None
            if not isinstance(text, str) or not text:
                raise ConfigError(f"{path}:{n}: no non-empty string field {field!r}")
            texts.append(text)
            ids.append(row.get(id_field, n))
    if not texts:
        raise ConfigError(f"{path}: no rows")
    return texts, ids


def write_vectors(out: str | Path, vectors: np.ndarray, ids: list) -> tuple[Path, Path]:
    """OUT.npy (float32, row i = vector i) and OUT.ids.jsonl (line i = id i), each written to a
    temporary file and renamed, so a crash leaves the old pair or none."""
    import os

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    npy, id_file = out.with_name(out.name + ".npy"), out.with_name(out.name + ".ids.jsonl")
    tmp_npy, tmp_ids = (p.with_name(f".{p.name}.tmp-{os.getpid()}") for p in (npy, id_file))
    with tmp_npy.open("wb") as f:
        np.save(f, vectors.astype(np.float32))
    tmp_ids.write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in ids), "utf-8")
    os.replace(tmp_npy, npy)
    os.replace(tmp_ids, id_file)
    return npy, id_file
