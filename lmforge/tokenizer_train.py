"""The `lmforge tokenizer` stage: train byte-level BPE on a sample of the training documents
(or copy a given tokenizer), save it, and report bytes per token per language in stats.json.
The tokenizer it makes is used through `lmforge.tokenizer.Tokenizer`.

The one idea: the sample is drawn from every source by `sample_budgets` (small languages lifted,
never a source's validation documents), so a corpus of any size trains in bounded time and the
bytes/token measured on validation text stays honest.
"""

from __future__ import annotations

import gzip
import os
import shutil
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import tokenizers as tk
from tqdm import tqdm

from lmforge.config import ConfigError, DataConfig, TokenizerConfig, resolve_path
from lmforge.data.readers import is_val, iter_documents, iter_split, source_files
from lmforge.io import write_json
from lmforge.tokenizer import BOS, SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# --------------------------------------------------------------------------- training


def new_bpe():
    """An untrained byte-level BPE pipeline: regex split, bytes, BPE, byte decoder; no normalizer
    (normalizing would make decode(encode(s)) != s)."""
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence(
        [
            tk.pre_tokenizers.Split(tk.Regex(SPLIT_PATTERN), behavior="isolated"),
            tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = tk.decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train byte-level BPE on `texts`; the vocabulary (specials included) has `vocab_size` ids."""
    tok = new_bpe()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,  # ids 0..12, in this order
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    add_bos_processor(tok)
    return Tokenizer(tok)


def add_bos_processor(tok) -> None:
    """Make other tools' default encode (transformers' `tok(text)`, lm-eval, vLLM) start with
    BOS, as every sequence lmforge trains on does. The same template transformers builds from
    add_bos_token, so it reads back unchanged."""
    tok.post_processor = tk.processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0",
        pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
        special_tokens=[(BOS, tok.token_to_id(BOS))],
    )


# --------------------------------------------------------------------------- sampling the corpus


def sample_budgets(
    sizes: list[int], langs: list[str], budget: int, alpha: float = 0.5
) -> list[int]:
    """Characters to read from each source so that the sample holds at most `budget` characters.

    Rule: languages get shares proportional to (their total size) ** alpha, and within a language
    each source gets a share proportional to its size (so every source gives the same fraction of
    itself, however the user cut a language into sources). alpha = 0.5 lifts small languages
    without letting them take over: 14 M English and 3.5 M Chinese characters share 67/33 instead
    of 80/20. No source gets more than its size; what it cannot use goes to the others (water
    filling), so a budget larger than the corpus reads everything."""
    n = len(sizes)
    lang_size: dict[str, int] = {}
    for s, lang in zip(sizes, langs):
        lang_size[lang] = lang_size.get(lang, 0) + s
    weight = [
        (lang_size[lang] ** alpha) * s / lang_size[lang] if s else 0.0
        for s, lang in zip(sizes, langs)
    ]
    out = [0] * n
    active = [i for i in range(n) if sizes[i] > 0]
    left = budget
    while active and left > 0:
        total = sum(weight[i] for i in active)
        share = {i: left * weight[i] / total for i in active}
        full = [i for i in active if share[i] >= sizes[i]]
        if not full:
            for i in active:
                out[i] = int(share[i])
            break
        for i in full:  # these sources fit whole: take them and share the rest again
            out[i] = sizes[i]
            left -= sizes[i]
        active = [i for i in active if i not in full]
    return out


def _gzip_size(path: Path) -> int:
    # the gzip trailer holds the uncompressed size mod 2**32: exact under 4 GiB; past that the
    # compressed size is at least a lower bound
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        size = int.from_bytes(f.read(4), "little")
    return max(size, path.stat().st_size)


def estimate_chars(files: list[Path]) -> int:
    """Roughly how many characters a source holds, without reading it: uncompressed bytes times
    the characters-per-byte of the first MB (about 1 for English, 1/3 for Chinese)."""
    if not files:
        return 0
    total = sum(
        _gzip_size(p) if p.name.lower().endswith(".gz") else p.stat().st_size for p in files
    )
    opener = gzip.open if files[0].name.lower().endswith(".gz") else open
    try:
        with opener(files[0], "rb") as f:
            head = f.read(1 << 20)
        ratio = len(head.decode("utf-8", errors="ignore")) / max(len(head), 1)
    except (OSError, EOFError, zlib.error):
        ratio = 1.0  # unreadable here: the reader will raise a proper error later
    if files[0].name.lower().endswith((".parquet", ".parquet.gz")):
        ratio = 1.0  # compressed columns: the byte count is already a rough lower bound
    return int(total * ratio)


def sample_texts(data_cfg: DataConfig, base_dir: str, sample_chars: int) -> Iterator[str]:
    """Training-split documents, at most `sample_chars` characters, drawn from every source by
    `sample_budgets` (each source read from its start up to its budget)."""
    sources = data_cfg.sources
    sizes = [estimate_chars(source_files(s, base_dir)) for s in sources]
    if sum(sizes) <= sample_chars:
        budgets = [sample_chars] * len(sources)  # the corpus fits: read all of it
    else:
        budgets = sample_budgets(sizes, [s.lang for s in sources], sample_chars)
    bar = tqdm(
        total=min(sample_chars, sum(sizes)),
        unit="char",
        unit_scale=True,
        delay=2.0,
        desc="tokenizer sample",
    )
    taken = 0
    for src, budget in zip(sources, budgets):
        got = 0
        for doc in iter_documents(src, base_dir):
            if got >= budget or taken >= sample_chars:
                break
            if is_val(doc, data_cfg.val_fraction):
                continue  # the tokenizer never sees validation text: bytes/token stays honest
            doc = doc[: min(budget - got, sample_chars - taken)]
            got += len(doc)
            taken += len(doc)
            bar.update(len(doc))
            yield doc
    bar.close()


def bytes_per_token(
    tok: Tokenizer, data_cfg: DataConfig, base_dir: str, max_chars: int = 2_000_000
) -> dict[str, float]:
    """UTF-8 bytes per token on validation documents, per language (at most max_chars each)."""
    n_bytes: dict[str, int] = {}
    n_tokens: dict[str, int] = {}
    n_chars: dict[str, int] = {}
    batch: list[tuple[str, str]] = []

    def flush():
        for (lang, _), ids in zip(batch, tok.encode_batch([d for _, d in batch])):
            n_tokens[lang] = n_tokens.get(lang, 0) + len(ids)
        batch.clear()

    for src, doc in iter_split(data_cfg, base_dir, "val"):
        if n_chars.get(src.lang, 0) >= max_chars:
            continue
        n_chars[src.lang] = n_chars.get(src.lang, 0) + len(doc)
        n_bytes[src.lang] = n_bytes.get(src.lang, 0) + len(doc.encode("utf-8"))
        batch.append((src.lang, doc))
        if len(batch) >= 256:
            flush()
    flush()
    return {lang: round(n_bytes[lang] / max(n_tokens[lang], 1), 4) for lang in sorted(n_bytes)}


# --------------------------------------------------------------------------- the stage


def run(cfg: TokenizerConfig, data_cfg: DataConfig, base_dir: str, out_dir: str | Path) -> dict:
    """The `tokenizer` stage: copy `cfg.path` or train on the data; save to out_dir with stats.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.path:
        src = resolve_path(cfg.path, base_dir)
        tok = Tokenizer.load(src)  # fails early, with the path, if it is not a tokenizer
        src_dir = src if src.is_dir() else src.parent
        if (src_dir / "tokenizer_config.json").is_file():
            for name in TOKENIZER_FILES:  # keep their config (chat template, specials) as it is
                if (src_dir / name).is_file():
                    shutil.copyfile(src_dir / name, out_dir / f".{name}.tmp")
                    os.replace(out_dir / f".{name}.tmp", out_dir / name)
        else:
            tok.save(out_dir)
    else:
        n_chars = 0

        def counted():
            nonlocal n_chars
            for text in sample_texts(data_cfg, base_dir, cfg.sample_chars):
                n_chars += len(text)
                yield text

        tok = train_tokenizer(counted(), cfg.vocab_size, cfg.min_frequency)
        if n_chars == 0:
            names = ", ".join(f"{s.name} ({s.path})" for s in data_cfg.sources) or "none"
            raise ConfigError(f"no training text for the tokenizer; data sources: {names}")
        tok.save(out_dir)
    stats = {
        "bytes_per_token": bytes_per_token(tok, data_cfg, base_dir) if data_cfg.sources else {},
        "vocab_size": tok.vocab_size,
        "fingerprint": tok.fingerprint(),
    }
    write_json(out_dir / "stats.json", stats)
    return stats
