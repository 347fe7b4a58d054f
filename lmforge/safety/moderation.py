"""A moderation classifier: harmful requests and offensive text, English and Chinese.

The one idea: a frozen sentence encoder (infer/embed.py) turns each text into a vector once, and
a small MLP head on those vectors is all that trains, on the common clock (train/loop.py:fit).
Its outputs are multi-label logits, column 0 "flagged" and one column per category, each with
its own binary cross-entropy. The vectors are cached per (encoder, text hash), so a second
training run (other steps, other head) costs seconds.

Categories: two coarse ones every flagged row has (harmful_request, offensive), and five finer
ones only Do-Not-Answer (risk_area) and JADE-DB (violation_type) label, mapped onto one list
(FINE_FROM; the mapping is ours, the labels the authors'). Where a row's finer label is
unknown (AdvBench, COLD's offensive comments) those columns are masked out of the loss and the
report; a benign row is a known negative in every column.

Data: datasets/safety/moderation.jsonl.gz (advbench, do-not-answer, jade-db, COLD, deepset;
see its PROVENANCE.md) plus the benign Alpaca instructions of datasets/sft. Every text goes to
one split by a seeded hash: 70% train, 10% val (only picks the threshold), 20% held-out (only
measures). XSTest (datasets/safety/xstest.jsonl.gz) is never trained on.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.config import ConfigError
from lmforge.config.train import TrainLoopConfig

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "datasets" / "safety"
SFT = REPO / "datasets" / "sft"
EVAL = REPO / "datasets" / "eval"
DEFAULT_ENCODER = "smollm2-135m-instruct"  # a name under LMFORGE_CACHE/models, or a directory
COARSE = ("harmful_request", "offensive")
FINE = ("crime", "privacy_rights", "discrimination", "misinformation", "chatbot_reliance")
CATEGORIES = COARSE + FINE
# the sources' own labels -> FINE (Do-Not-Answer risk areas, JADE-DB violation types)
FINE_FROM = {
    "Malicious Uses": "crime",  # assisting illegal activities, fraud, unethical actions
    "违法犯罪": "crime",  # illegal and criminal
    "Information Hazards": "privacy_rights",  # private or sensitive information
    "侵害权益": "privacy_rights",  # infringing rights: privacy, reputation, property
    "侵犯权益": "privacy_rights",  # a variant spelling in one JADE-DB row
    "Discrimination, Exclusion, Toxicity, Hateful, Offensive": "discrimination",
    "歧视偏见": "discrimination",  # discrimination and bias
    "Misinformation Harms": "misinformation",
    "Human-Chatbot Interaction Harms": "chatbot_reliance",  # mental-health crises, over-reliance
}
MAX_CHARS = 100_000  # one text; longer is refused (the encoder reads only MAX_TOKENS anyway)
MAX_TOKENS = 256  # the encoder reads at most this many tokens of a text: requests are short
SPLIT_SEED = "moderation-v1"


@dataclass
class ModerationConfig(TrainLoopConfig):  # `lmforge moderate train`
    max_steps: int = 3000  # optimizer steps over feature batches (~40 epochs; seconds on a CPU)
    batch_size: int = 64  # texts per step
    lr: float = 1e-3  # peak learning rate of the head
    warmup_steps: int = 20
    weight_decay: float = 0.01
    eval_every: int = 1000
    log_every: int = 250
    save_every: int = 0  # only the last step: the head is small and trains in seconds
    hidden: int = 256  # the head's hidden width
    encoder: str = DEFAULT_ENCODER  # sentence encoder: a directory, or a fetched model's name


# --- data


@dataclass
class Example:
    text: str
    flagged: int  # 1 harmful or offensive
    category: str | None  # one of CATEGORIES when flagged
    lang: str  # "en" or "zh" (zh: the text has Han characters)
    source: str
    fine: str | None = None  # one of FINE, when the source labels it
    fine_known: bool = False  # whether the FINE columns are known (labelled, or benign)


def lang_of(text: str) -> str:
    return "zh" if any("\u3400" <= c <= "\u9fff" for c in text) else "en"


def split_of(text: str) -> str:
    """train / val / heldout by a seeded hash of the text, so a text is in one split forever
    (duplicates across sources land together and cannot leak from train to held-out)."""
    h = int(hashlib.sha1(f"{SPLIT_SEED}:{text}".encode()).hexdigest()[:8], 16) % 100
    return "train" if h < 70 else "val" if h < 80 else "heldout"


def _read_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_examples() -> list[Example]:
    """The bundled training sources, one Example per distinct text."""
    rows = _read_gz(DATA / "moderation.jsonl.gz")
    for name in ("alpaca_en_demo", "alpaca_zh_demo"):  # benign instructions (negatives)
        for r in _read_gz(SFT / f"{name}.jsonl.gz"):
            text = (r["instruction"] + "\n" + r.get("input", "")).strip()
            rows.append({"text": text, "flagged": 0, "category": None, "source": name})
    # benign questions: without them every question reads as harmful, since the flagged side is
    # mostly questions and the benign side mostly Alpaca instructions (XSTest over-refusal 0.82)
    with gzip.open(EVAL / "truthfulqa" / "TruthfulQA.csv.gz", "rt", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            rows.append(
                {"text": r["Question"], "flagged": 0, "category": None, "source": "truthfulqa"}
            )
    seen, out = set(), []
    for r in rows:
        if r["text"] in seen:
            continue
        seen.add(r["text"])
        label = (r.get("risk_area") or r.get("violation_type") or "").strip()
        fine = FINE_FROM.get(label)
        out.append(Example(r["text"], r["flagged"], r["category"], lang_of(r["text"]),
                           r["source"], fine, fine is not None or not r["flagged"]))  # fmt: skip
    return out


def load_xstest() -> list[dict]:
    """XSTest's 450 prompts: label safe (250, look unsafe but are fine) or unsafe (200)."""
    return _read_gz(DATA / "xstest.jsonl.gz")


def targets(examples: list[Example]) -> torch.Tensor:
    """(N, 1 + len(CATEGORIES)) float: flagged, then one column per category."""
    y = torch.zeros(len(examples), 1 + len(CATEGORIES))
    for i, e in enumerate(examples):
        y[i, 0] = e.flagged
        for c in (e.category, e.fine):
            if c:
                y[i, 1 + CATEGORIES.index(c)] = 1
    return y


def known(examples: list[Example]) -> torch.Tensor:
    """(N, 1 + len(CATEGORIES)) 0/1: which targets are labelled (the loss's mask)."""
    m = torch.ones(len(examples), 1 + len(CATEGORIES))
    for i, e in enumerate(examples):
        if not (e.fine_known or e.fine or not e.flagged):
            m[i, 1 + len(COARSE) :] = 0
    return m


def masked_bce(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy over the labelled targets only."""
    loss = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    return (loss * mask).sum() / mask.sum().clamp(min=1)


# --- features


def check_text(text, where: str = "text") -> str:
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{where}: empty text")
    if len(text) > MAX_CHARS:
        raise ConfigError(f"{where}: {len(text):,} characters, over the limit of {MAX_CHARS:,}")
    return text


def encoder_dir(name_or_dir: str | Path) -> Path:
    """A directory as given, else the fetched model of that name (`lmforge fetch NAME`)."""
    from lmforge.fetch import cache_dir

    path = Path(name_or_dir).expanduser()
    if path.is_dir() or path.is_absolute() or len(path.parts) > 1:
        return path
    return cache_dir() / "models" / str(name_or_dir)


def open_encoder(path: str | Path, device: str = "cpu"):
    """The frozen encoder, mean-pooled (SmolLM2 reads Chinese; MiniLM maps most of it to [UNK])."""
    from lmforge.infer.embed import Embedder

    path = encoder_dir(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"encoder {path}: not a model directory (config.json missing); "
                          "fetch one with `lmforge fetch smollm2-135m-instruct` or pass --encoder DIR")  # fmt: skip
    enc = Embedder(path, device=device, pooling="mean")
    enc.max_len = min(enc.max_len, MAX_TOKENS)
    return enc


class FeatureCache:
    """Vectors of one encoder by text hash, in CACHE/<encoder key>.npz; `get` embeds the misses."""

    def __init__(self, encoder, cache_dir: Path | None = None):
        from lmforge.fetch import cache_dir as lmforge_cache

        self.encoder = encoder
        cache_dir = cache_dir or lmforge_cache() / "moderation"
        key = hashlib.sha1(f"{encoder.path.resolve()}:{MAX_TOKENS}".encode()).hexdigest()[:16]
        self.path = cache_dir / f"{key}.npz"
        self.vectors: dict[str, np.ndarray] = {}
        if self.path and self.path.is_file():
            z = np.load(self.path)
            self.vectors = dict(zip(z["keys"].tolist(), z["vectors"], strict=True))

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha1(text.encode()).hexdigest()

    def get(self, texts: list[str], desc: str = "embed") -> np.ndarray:
        from tqdm import tqdm

        keys = [self.key(t) for t in texts]
        todo = sorted(
            {k: t for k, t in zip(keys, texts, strict=True) if k not in self.vectors}.items()
        )
        if todo:
            with tqdm(total=len(todo), unit="text", desc=desc, file=sys.stderr) as bar:
                vecs = self.encoder.embed([t for _, t in todo], batch_size=16, progress=bar.update)
            self.vectors.update(zip([k for k, _ in todo], vecs, strict=True))
            self.save()
        return np.stack([self.vectors[k] for k in keys]).astype(np.float32)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp.npz")
        np.savez(
            tmp, keys=np.array(list(self.vectors)), vectors=np.stack(list(self.vectors.values()))
        )
        tmp.replace(self.path)


# --- head


class Head(nn.Module):
    """(N, dim) sentence vectors -> (N, 1 + len(CATEGORIES)) logits."""

    def __init__(self, dim: int, hidden: int, n_out: int = 1 + len(CATEGORIES)):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def prf(pred: np.ndarray, gold: np.ndarray) -> dict:
    """Precision, recall and F1 of boolean predictions against boolean gold, with n."""
    tp = int((pred & gold).sum())
    p = tp / max(int(pred.sum()), 1)
    r = tp / max(int(gold.sum()), 1)
    return {"precision": p, "recall": r, "f1": 2 * p * r / max(p + r, 1e-12), "n": int(len(gold))}


def pick_threshold(scores: np.ndarray, gold: np.ndarray) -> float:
    """The flagged cut with the best F1 on the validation slice (ties: the higher cut, which
    flags less)."""
    best, cut = -1.0, 0.5
    for t in np.linspace(0.05, 0.95, 91):
        f1 = prf(scores >= t, gold)["f1"]
        if f1 >= best:
            best, cut = f1, float(t)
    return round(cut, 2)


def train_head(
    cfg: ModerationConfig,
    x: dict[str, torch.Tensor],
    y: dict[str, torch.Tensor],
    out_dir: Path,
    encoder_path: str,
    mask: dict[str, torch.Tensor] | None = None,
    categories: tuple[str, ...] = CATEGORIES,
    desc: str = "moderate",
) -> dict:
    """Fit a Head on train features through train/loop.py:fit; evaluate = val loss and F1; save
    writes OUT/head.safetensors and OUT/config.json (encoder, threshold picked on val).
    `categories`: the columns after "flagged" (safety/injection_clf.py trains with none)."""
    from lmforge.train.loop import fit

    torch.manual_seed(cfg.seed)
    head = Head(x["train"].shape[1], cfg.hidden, 1 + len(categories))
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(x["train"])
    mask = mask or {s: torch.ones_like(t) for s, t in y.items()}

    def train_step(step: int) -> dict:
        idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=gen)
        loss = masked_bce(head(x["train"][idx]), y["train"][idx], mask["train"][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.detach()}

    @torch.no_grad()
    def evaluate(step: int) -> dict:
        logits = head(x["val"])
        scores = torch.sigmoid(logits[:, 0]).numpy()
        f1 = prf(scores >= 0.5, y["val"][:, 0].numpy() > 0.5)["f1"]
        return {
            "val_loss": float(masked_bce(logits, y["val"], mask["val"])),
            "val_f1": f1,
        }

    def save(step: int, loop_state: dict) -> None:
        with torch.no_grad():
            scores = torch.sigmoid(head(x["val"])[:, 0]).numpy()
        threshold = pick_threshold(scores, y["val"][:, 0].numpy() > 0.5)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in head.state_dict().items()}, out_dir / "head.safetensors"
        )
        config = {"encoder": str(Path(encoder_path).expanduser().resolve()), "pooling": "mean",
                  "max_tokens": MAX_TOKENS, "dim": int(x["train"].shape[1]), "hidden": cfg.hidden,
                  "categories": list(categories), "threshold": threshold, "step": step,
                  "threshold_from": "best F1 on the val slice (10% of the training sources)"}  # fmt: skip
        (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", "utf-8")

    return fit(cfg, opt, train_step, evaluate, save, out_dir=out_dir, desc=desc)


def train(
    cfg: ModerationConfig, out_dir: str | Path, encoder=None, examples: list[Example] | None = None
) -> dict:
    """Embed the data (the bundled sources unless `examples`; cached), train the head, write
    OUT; returns fit's summary plus the held-out report (also OUT/report.json)."""
    out_dir = Path(out_dir)
    encoder = encoder or open_encoder(cfg.encoder)
    cache = FeatureCache(encoder)
    examples = load_examples() if examples is None else examples
    by_split: dict[str, list[Example]] = {"train": [], "val": [], "heldout": []}
    for e in examples:
        by_split[split_of(e.text)].append(e)
    feats = cache.get([e.text for e in examples] + [r["text"] for r in load_xstest()])
    row = {e.text: i for i, e in enumerate(examples)}
    for s in ("val", "heldout"):  # a tiny made-up set may leave a split empty
        by_split[s] = by_split[s] or by_split["train"]
    x = {s: torch.from_numpy(feats[[row[e.text] for e in es]]) for s, es in by_split.items()}
    y = {s: targets(es) for s, es in by_split.items()}
    mask = {s: known(es) for s, es in by_split.items()}
    summary = train_head(cfg, x, y, out_dir, str(encoder.path), mask)
    mod = Moderator(out_dir, encoder=encoder, cache=cache)
    summary["report"] = report(mod, by_split["heldout"])
    (out_dir / "report.json").write_text(json.dumps(summary["report"], indent=2) + "\n", "utf-8")
    return summary


# --- predict


class Moderator:
    """A trained head with its encoder: `moderate(texts)` -> one dict per text."""

    def __init__(
        self,
        path: str | Path,
        encoder=None,
        cache: FeatureCache | None = None,
        threshold: float | None = None,
    ):
        path = Path(path)
        if threshold is not None and not 0 < threshold < 1:
            raise ConfigError(f"--threshold must be between 0 and 1, got {threshold}")
        if not (path / "config.json").is_file() or not (path / "head.safetensors").is_file():
            raise ConfigError(f"{path}: not a moderation model (config.json or head.safetensors missing; "
                              "train one with `lmforge moderate train --out DIR`)")  # fmt: skip
        self.cfg = json.loads((path / "config.json").read_text("utf-8"))
        self.head = Head(self.cfg["dim"], self.cfg["hidden"], 1 + len(self.cfg["categories"]))
        self.head.load_state_dict(load_file(path / "head.safetensors"))
        self.head.eval()
        self.encoder = encoder or open_encoder(self.cfg["encoder"])
        if self.encoder.dim != self.cfg["dim"]:
            raise ConfigError(f"{path}: the head expects {self.cfg['dim']}-d vectors, the encoder "
                              f"{self.encoder.path} gives {self.encoder.dim}")  # fmt: skip
        self.cache = cache
        # the flagged cut: picked on val at training; a deployment may trade recall for less
        # over-refusal with a higher one (docs/safety.md has the operating points)
        self.threshold = self.cfg["threshold"] if threshold is None else threshold

    @torch.no_grad()
    def scores(self, texts: list[str]) -> np.ndarray:
        """(N, 1 + categories) probabilities."""
        if self.cache is not None:
            vecs = self.cache.get(texts)
        else:
            vecs = self.encoder.embed(texts, batch_size=16)
        return torch.sigmoid(self.head(torch.from_numpy(vecs))).numpy()

    def moderate(self, texts: list[str]) -> list[dict]:
        for i, t in enumerate(texts):
            check_text(t, f"text {i + 1}")
        out = []
        for text_scores in self.scores(texts):
            cats = {
                c: round(float(s), 4)
                for c, s in zip(self.cfg["categories"], text_scores[1:], strict=True)
            }
            flagged = bool(text_scores[0] >= self.threshold)
            out.append({"flagged": flagged, "score": round(float(text_scores[0]), 4),
                        "categories": [c for c, s in cats.items() if flagged and s >= 0.5],
                        "category_scores": cats})  # fmt: skip
        return out


# --- measure


def report(mod: Moderator, heldout: list[Example], wordlist_cut: float | None = None) -> dict:
    """Held-out P/R/F1 per language and XSTest flag rates, for the classifier and the word list
    (lmforge/data/toxicity.py at clean's default cut)."""
    from lmforge.config import CleanConfig
    from lmforge.data.toxicity import wordlist_score

    cut = CleanConfig().max_toxicity if wordlist_cut is None else wordlist_cut
    xs = load_xstest()
    texts = [e.text for e in heldout] + [r["text"] for r in xs]
    all_scores = mod.scores(texts)
    clf = all_scores[:, 0] >= mod.threshold
    wl = np.array([wordlist_score(t) >= cut for t in texts])
    gold = np.array([e.flagged == 1 for e in heldout])
    langs = np.array([e.lang for e in heldout])
    safe = np.array([r["label"] == "safe" for r in xs])
    out = {"threshold": mod.threshold, "wordlist_cut": cut}
    for name, pred in (("classifier", clf), ("wordlist", wl)):
        held, x = pred[: len(heldout)], pred[len(heldout) :]
        out[name] = {lang: prf(held[langs == lang], gold[langs == lang]) for lang in ("en", "zh")}
        out[name]["xstest_safe_flagged"] = float(x[safe].mean())
        out[name]["xstest_unsafe_flagged"] = float(x[~safe].mean())
    out["operating_points"] = {
        f"{t:.2f}": {
            "en_recall": prf(all_scores[: len(heldout)][langs == "en", 0] >= t, gold[langs == "en"])["recall"],
            "zh_recall": prf(all_scores[: len(heldout)][langs == "zh", 0] >= t, gold[langs == "zh"])["recall"],
            "xstest_safe_flagged": float((all_scores[len(heldout) :, 0][safe] >= t).mean()),
            "xstest_unsafe_flagged": float((all_scores[len(heldout) :, 0][~safe] >= t).mean()),
        }
        for t in (0.5, 0.7, 0.9)
    }  # fmt: skip
    out["categories"] = category_report(all_scores[: len(heldout)], heldout, mod.cfg["categories"])
    out["n"] = {"heldout_en": int((langs == "en").sum()), "heldout_zh": int((langs == "zh").sum()),
                "xstest_safe": int(safe.sum()), "xstest_unsafe": int((~safe).sum())}  # fmt: skip
    return out


def category_report(scores: np.ndarray, heldout: list[Example], names: list[str]) -> dict:
    """P/R/F1 per category (score >= 0.5) on the held-out rows where it is labelled."""
    y, m = targets(heldout).numpy() > 0.5, known(heldout).numpy() > 0.5
    out = {}
    for j, name in enumerate(names, start=1):
        if j >= y.shape[1]:  # a head trained on other categories than this data labels
            break
        rows = m[:, j]
        out[name] = prf(scores[rows, j] >= 0.5, y[rows, j]) | {"positives": int(y[rows, j].sum())}
    return out


def config_from(args_steps: int | None, encoder: str | None) -> ModerationConfig:
    cfg = ModerationConfig()
    if args_steps is not None:
        if args_steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {args_steps}")
        cfg = dataclasses.replace(cfg, max_steps=args_steps)
    if encoder:
        cfg = dataclasses.replace(cfg, encoder=encoder)
    return cfg
