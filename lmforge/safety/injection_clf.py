"""A trained prompt-injection classifier: the second half of the detector, beside the rules of
data/injection.py (infer/untrusted.py's `Defence` flags a text when either does).

The one idea: the moderation machinery (safety/moderation.py: a frozen sentence encoder, cached
vectors, a small MLP head on the common clock) trained on the bundled injection sets, with a
text scored by its worst window. A mean-pooled vector of a whole passage barely moves when one
sentence in it gives orders, and the encoder reads only MAX_TOKENS (BIPIA plants its attacks at
the start, middle or end of e-mails, tables and code of up to ~1,200 tokens). So a text is cut
into overlapping windows of WINDOW tokens, where an instruction is a large part of one, and its
score is the highest window's. Training sees windows too: in a poisoned document only the
windows that are mostly the planted instruction are labelled injections, the ones around it
are clean text. The threshold keeps false alarms on clean val texts at MAX_FPR: a held-back
clean chunk is evidence the answer loses.

Data: datasets/injection, the deepset `train` split and BIPIA's `injection_pairs_train`, plus
600 clean Wikipedia passages (datasets/enwiki) and 200 more with one of those train injections
planted in them (`prose_rows`: prose, what a retrieved chunk looks like, on both sides). A
seeded 15% (by BIPIA context or article, so a clean e-mail and its poisoned copy stay together)
is the val slice that picks the threshold. The test files are never read here.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from lmforge.config import ConfigError
from lmforge.safety.moderation import (
    MAX_CHARS,
    MAX_TOKENS,
    FeatureCache,
    Head,
    ModerationConfig,
    check_text,
    open_encoder,
    prf,
    train_head,
)

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "datasets" / "injection"
TRAIN_FILES = ("deepset-prompt-injections/train.jsonl.gz", "bipia/injection_pairs_train.jsonl.gz")
TEST_FILES = {
    "deepset test": "deepset-prompt-injections/test.jsonl.gz",
    "bipia test": "bipia/injection_pairs_test.jsonl.gz",
}
ENWIKI = REPO / "datasets" / "enwiki" / "enwiki_extract_train_head6000.jsonl.gz"
N_PROSE = (600, 200)  # clean prose passages, and passages with a planted instruction (`prose_rows`)
WINDOW = 64  # tokens: an instruction of a sentence or two is a large part of a window this size
PASSAGE_CHARS = 1200  # their length: ~200 words, a rag chunk's (`rag index` --max-tokens 200)
SPLIT_SEED = "injection-v1"
VAL_PERCENT = 15
MAX_FPR = 0.01  # the threshold: at most this share of the clean val texts flagged
DEFAULT_ENCODER = "all-minilm-l6-v2"  # a name under LMFORGE_CACHE/models, or a directory
KIND = "prompt-injection"  # config.json's "kind": a moderation head is not an injection head


@dataclass
class InjectionConfig(ModerationConfig):  # `lmforge injection train`
    max_steps: int = 2000  # optimizer steps over feature batches (seconds on a CPU)
    eval_every: int = 500
    window: int = WINDOW  # tokens per window a text is scored by (0: its first MAX_TOKENS whole)
    # MiniLM, not moderation's SmolLM2: the detector embeds every retrieved chunk and tool result,
    # and SmolLM2 has 6x the parameters for a head only a little better on deepset
    # (docs/injection.md); Chinese MiniLM maps to [UNK], which the rules cover
    encoder: str = DEFAULT_ENCODER


@dataclass
class Row:
    text: str
    label: int  # 1 injection
    group: str  # texts of one group land in one split (a BIPIA context's clean and poisoned copy)
    injected: str | None = None  # the planted instruction, where the data says (BIPIA)


def read_rows(rel: str) -> list[Row]:
    with gzip.open(DATA / rel, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [
        Row(r["text"], int(r["label"]), r.get("context_id") or r["text"], r.get("injected"))
        for r in rows
    ]


def wiki_passages(n: int, chars: int = PASSAGE_CHARS, seed: int = 0) -> list[tuple[str, str]]:
    """`n` (article id, passage) pairs of datasets/enwiki: `chars` characters from a seeded random
    sentence start of a seeded random article, cut at a sentence end: prose like a rag chunk."""
    import random

    with gzip.open(ENWIKI, "rt", encoding="utf-8") as f:
        articles = [json.loads(line) for line in f if line.strip()]
    rng = random.Random(seed)
    out = []
    for a in rng.sample(articles, n):
        text = a["text"]
        starts = [0] + [i + 2 for i in range(len(text)) if text.startswith(". ", i)]
        start = rng.choice([i for i in starts if i < max(len(text) - chars, 1)] or [0])
        piece = text[start : start + chars]
        cut = piece.rfind(". ")
        out.append((f"enwiki-{a['id']}", piece[: cut + 1] if cut > chars // 3 else piece))
    return out


def plant_at_random(text: str, attack: str, rng) -> str:
    """`attack` inserted at a random sentence boundary of `text` (or its start or end)."""
    cuts = [0, len(text)] + [i + 2 for i in range(len(text)) if text.startswith(". ", i)]
    cut = rng.choice(cuts)
    return f"{text[:cut]}{attack} {text[cut:]}".strip()


def prose_rows(rows: list[Row], n: tuple[int, int] = N_PROSE, seed: int = 0) -> list[Row]:
    """`n[0]` clean Wikipedia passages and `n[1]` more with an instruction from `rows` (the
    injections of the train files: BIPIA's planted instructions, deepset's short injections)
    planted at a random sentence boundary. The injection sets' clean side is user questions,
    e-mails, tables and code: without prose, the head flags 41% of the rag corpus's clean chunks
    (docs/injection.md). Clean ones outnumber the rest, as in retrieval. No rag corpus article
    is among these (no shared titles)."""
    import random

    rng = random.Random(seed)
    attacks = sorted(
        {r.injected or r.text for r in rows if r.label == 1 and len(r.injected or r.text) < 400}
    )
    out = []
    for k, (group, text) in enumerate(wiki_passages(sum(n), seed=seed)):
        if k < n[0]:
            out.append(Row(text, 0, group))
        else:
            attack = rng.choice(attacks)
            out.append(Row(plant_at_random(text, attack, rng), 1, group, attack))
    return out


def load_train() -> list[Row]:
    rows = [r for rel in TRAIN_FILES for r in read_rows(rel)]
    return rows + prose_rows(rows)


def split_of(row: Row) -> str:
    """train or val by a seeded hash of the row's group."""
    h = int(hashlib.sha1(f"{SPLIT_SEED}:{row.group}".encode()).hexdigest()[:8], 16) % 100
    return "val" if h < VAL_PERCENT else "train"


# --- windows


def window_spans(text: str, count_tokens, max_tokens: int) -> list[tuple[int, int]]:
    """[(start, end)] character spans covering `text`: the whole when it fits in `max_tokens`
    (2 kept for special tokens), else overlapping windows (a quarter shared with the next) that
    each fit: an instruction up to a quarter of a window long is whole in one of them."""
    limit = max_tokens - 2
    if count_tokens(text) <= limit:
        return [(0, len(text))]
    size = 4 * limit  # characters: ~4 per English token; halved until every window fits
    while True:
        step = size * 3 // 4
        starts = range(0, max(len(text) - size, 0) + step, step)
        spans = [
            (i, min(i + size, len(text))) for i in starts if i == 0 or i + size - step < len(text)
        ]
        if size <= 32 or all(count_tokens(text[a:b]) <= limit for a, b in spans):
            return spans
        size //= 2


def windows(text: str, count_tokens, window: int = WINDOW) -> list[str]:
    """The texts a text is scored by: its windows of `window` tokens (0: the text itself, which
    the encoder reads up to MAX_TOKENS)."""
    if window == 0:
        return [text]
    return [text[a:b] for a, b in window_spans(text, count_tokens, window)]


def labelled_windows(row: Row, count_tokens, window: int = WINDOW) -> list[tuple[str, int]]:
    """(window, label) pairs to train on. A poisoned text's windows are labelled by how much of
    its planted instruction they hold: 1 when half the instruction or half the window is
    instruction, 0 when none, left out in between (ambiguous); a text whose instruction is not
    known gives every window its label."""
    if window == 0:
        return [(row.text, row.label)]
    spans = window_spans(row.text, count_tokens, window)
    inj = row.injected.strip() if row.injected else ""
    s = row.text.find(inj) if inj else -1
    if row.label == 0 or len(spans) == 1 or s < 0:
        return [(row.text[a:b], row.label) for a, b in spans]
    e, out = s + len(inj), []
    for a, b in spans:
        shared = max(0, min(b, e) - max(a, s))
        if shared >= 0.5 * min(e - s, b - a):
            out.append((row.text[a:b], 1))
        elif shared == 0:
            out.append((row.text[a:b], 0))
    return out


# --- train


def feature_cache(encoder) -> FeatureCache:
    """The vectors of this encoder's windows, apart from moderation's (CACHE/injection)."""
    from lmforge.fetch import cache_dir

    return FeatureCache(encoder, cache_dir() / "injection")


def train(cfg: InjectionConfig, out_dir: str | Path, encoder=None, rows: list[Row] | None = None):
    """Embed the (windowed) training rows (cached), fit the head, pick the threshold on val,
    write OUT (head.safetensors, config.json with kind, window and threshold, report.json with
    the val figures); returns fit's summary with `report`."""
    out_dir = Path(out_dir)
    encoder = encoder or open_encoder(cfg.encoder)
    cache = feature_cache(encoder)
    rows = load_train() if rows is None else rows
    by_split: dict[str, list[tuple[str, int]]] = {"train": [], "val": []}
    for r in rows:
        by_split[split_of(r)] += labelled_windows(r, encoder.count_tokens, cfg.window)
    by_split["val"] = by_split["val"] or by_split["train"]  # a tiny made-up set
    x, y = {}, {}
    for s, pairs in by_split.items():
        x[s] = torch.from_numpy(cache.get([t for t, _ in pairs], desc=f"embed {s}"))
        y[s] = torch.tensor([[float(label)] for _, label in pairs])
    summary = train_head(cfg, x, y, out_dir, str(encoder.path), categories=(), desc="injection")
    # the cut: train_head's is per window at best F1; a defence is judged per text, and a clean
    # text held back is evidence lost, so the cut is the lowest that keeps val's false alarms
    # at MAX_FPR, each val text scored by its worst window
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text("utf-8"))
    config.update(kind=KIND, window=cfg.window)
    config_path.write_text(json.dumps(config, indent=2) + "\n", "utf-8")
    clf = InjectionClassifier(out_dir, encoder=encoder, cache=cache)
    val = [r for r in rows if split_of(r) == "val"] or rows
    gold = np.array([r.label == 1 for r in val])
    scores = clf.scores([r.text for r in val])
    clf.threshold = config["threshold"] = threshold_at_fpr(scores, gold, MAX_FPR)
    config["threshold_from"] = (f"the lowest cut with at most {MAX_FPR:.0%} of the clean val texts "
                                f"flagged (val: {VAL_PERCENT}% of the training data)")  # fmt: skip
    config_path.write_text(json.dumps(config, indent=2) + "\n", "utf-8")
    summary["report"] = {
        "threshold": clf.threshold,
        "val": prf(scores >= clf.threshold, gold),
        "val_false_positive_rate": float((scores[~gold] >= clf.threshold).mean())
        if (~gold).any()
        else 0.0,
        "n_windows": {s: len(p) for s, p in by_split.items()},
    }
    (out_dir / "report.json").write_text(json.dumps(summary["report"], indent=2) + "\n", "utf-8")
    return summary


def threshold_at_fpr(scores: np.ndarray, gold: np.ndarray, max_fpr: float) -> float:
    """The lowest cut (a grid of 0.01 steps, finer near 1) at which at most `max_fpr` of the
    negatives score at or above it."""
    neg = scores[~gold]
    grid = [*np.round(np.arange(0.05, 0.99, 0.01), 2), 0.99, 0.995, 0.999]
    for t in grid:
        if neg.size == 0 or (neg >= t).mean() <= max_fpr:
            return float(t)
    return 0.999


def config_from(steps: int | None, encoder: str | None, window: int | None = None):
    cfg = InjectionConfig()
    if steps is not None:
        if steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {steps}")
        cfg = dataclasses.replace(cfg, max_steps=steps)
    if encoder:
        cfg = dataclasses.replace(cfg, encoder=encoder)
    if window is not None:
        if not 0 <= window <= MAX_TOKENS:
            raise ConfigError(f"--window must be 0 to {MAX_TOKENS} tokens, got {window}")
        cfg = dataclasses.replace(cfg, window=window)
    return cfg


# --- predict


class InjectionClassifier:
    """A trained injection head with its encoder: `classify(texts)` -> one dict per text;
    `flags(text)` is what infer/untrusted.py's Defence asks."""

    def __init__(
        self, path: str | Path, encoder=None, cache: FeatureCache | None = None, device="cpu"
    ):
        path = Path(path)
        if not (path / "config.json").is_file() or not (path / "head.safetensors").is_file():
            raise ConfigError(f"{path}: not an injection model (config.json or head.safetensors "
                              "missing; train one with `lmforge injection train --out DIR`)")  # fmt: skip
        self.cfg = json.loads((path / "config.json").read_text("utf-8"))
        if self.cfg.get("kind") != KIND:
            raise ConfigError(f"{path}: not an injection model (its config.json has no "
                              f'"kind": "{KIND}"; a moderation head?)')  # fmt: skip
        self.head = Head(self.cfg["dim"], self.cfg["hidden"], 1)
        self.head.load_state_dict(load_file(path / "head.safetensors"))
        self.head.eval()
        self.encoder = encoder or open_encoder(self.cfg["encoder"], device)
        if self.encoder.dim != self.cfg["dim"]:
            raise ConfigError(f"{path}: the head expects {self.cfg['dim']}-d vectors, the encoder "
                              f"{self.encoder.path} gives {self.encoder.dim}")  # fmt: skip
        self.cache = cache
        self.threshold = self.cfg["threshold"]
        self.window = self.cfg["window"]

    def _vectors(self, texts: list[str]) -> np.ndarray:
        if self.cache is not None:
            return self.cache.get(texts)
        return self.encoder.embed(texts, batch_size=16)

    @torch.no_grad()
    def scores(self, texts: list[str], window: int | None = None) -> np.ndarray:
        """(N,) probabilities: each text's highest window (`window` tokens; default the one it
        was trained with; 0: the text's first MAX_TOKENS, as the encoder truncates)."""
        window = self.window if window is None else window
        parts = [windows(t, self.encoder.count_tokens, window) for t in texts]
        flat = [p for ps in parts for p in ps]
        probs = torch.sigmoid(self.head(torch.from_numpy(self._vectors(flat)))[:, 0]).numpy()
        ends = np.cumsum([len(ps) for ps in parts])
        return np.array([probs[e - len(ps) : e].max() for e, ps in zip(ends, parts, strict=True)])

    def classify(self, texts: list[str]) -> list[dict]:
        for i, t in enumerate(texts):
            check_text(t, f"text {i + 1}")
        return [
            {"flagged": bool(s >= self.threshold), "score": round(float(s), 4)}
            for s in self.scores(texts)
        ]

    def flags(self, text: str) -> bool:
        """Untrusted text is never refused for its size here: an empty one is clean, a huge one
        is scored on its first MAX_CHARS (the prompt could not hold more)."""
        if not text.strip():
            return False
        return bool(self.scores([text[:MAX_CHARS]])[0] >= self.threshold)


def evaluate(clf: InjectionClassifier, rows: list[Row], window: int | None = None) -> dict:
    """P/R/F1 of the classifier, the rules, and rules OR classifier on `rows`."""
    from lmforge.data.injection import is_injection

    gold = np.array([r.label == 1 for r in rows])
    c = clf.scores([r.text for r in rows], window) >= clf.threshold
    rules = np.array([is_injection(r.text) for r in rows])
    return {"rules": prf(rules, gold), "classifier": prf(c, gold), "either": prf(rules | c, gold)}
