"""Text similarity tasks (summarisation, translation): BLEU with sacrebleu, ROUGE with rouge-score.

The one idea: the metrics are the reference libraries' own, called on the model's greedy
outputs, so a score here is comparable with a score printed anywhere else for the same data.
A task is a JSONL file of {"source": ..., "reference": ...} rows; the model sees the source
rendered through a prompt template and its answer is cut at the first blank line.

BLEU uses sacrebleu's defaults (13a tokenisation) unless `tokenize` says otherwise; for Chinese
pass "zh" (character-level, as sacrebleu recommends). ROUGE-1/2/L are F-measures with
stemming; rouge-score keeps only ASCII letters and digits, so for Chinese text it is computed
on characters.
"""

from __future__ import annotations

import math
from pathlib import Path

from lmforge.config import ConfigError
from lmforge.data.readers import read_jsonl
from lmforge.infer.generate import fit_prompt, stream_text


def _pair_row(row) -> dict:
    if not isinstance(row, dict) or not all(
        isinstance(row.get(k), str) for k in ("source", "reference")
    ):
        raise ValueError("a row needs string fields 'source' and 'reference'")
    return row


def read_pairs(path: str | Path, limit: int | None = None) -> list[dict]:
    """The rows of a JSONL file (plain or .gz) with string `source` and `reference` fields."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"similarity task data not found: {path}")
    rows, _ = read_jsonl(path, _pair_row, max_rows=limit or 0, skippable=False)
    if not rows:
        raise ConfigError(f"{path} has no rows")
    return rows


def _has_cjk(texts: list[str]) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for t in texts for ch in t)


def bleu(hypotheses: list[str], references: list[str], tokenize: str | None = None) -> dict:
    """Corpus BLEU (0-100) and its signature; tokenize defaults to "zh" for Chinese text."""
    import sacrebleu

    tokenize = tokenize or ("zh" if _has_cjk(references) else "13a")
    result = sacrebleu.corpus_bleu(hypotheses, [references], tokenize=tokenize)
    return {"bleu": result.score, "tokenize": tokenize, "n": len(hypotheses)}


class _Characters:
    """rouge-score tokenizer for Chinese: every non-space character is a token."""

    def tokenize(self, text: str) -> list[str]:
        return [ch for ch in text if not ch.isspace()]


def rouge(hypotheses: list[str], references: list[str]) -> dict:
    """Mean ROUGE-1/2/L F-measures (0-1) with their standard errors over the examples."""
    from rouge_score import rouge_scorer

    cjk = _has_cjk(references)
    keys = ["rouge1", "rouge2", "rougeL"]
    if cjk:  # the default tokenizer keeps only [a-z0-9] runs: score Chinese per character
        scorer = rouge_scorer.RougeScorer(keys, tokenizer=_Characters())
    else:
        scorer = rouge_scorer.RougeScorer(keys, use_stemmer=True)
    rows = [scorer.score(r, h) for h, r in zip(hypotheses, references)]
    out: dict = {"n": len(rows)}
    for key in ("rouge1", "rouge2", "rougeL"):
        values = [r[key].fmeasure for r in rows]
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)
        out[key], out[f"{key}_stderr"] = mean, math.sqrt(var / len(values))
    return out


def evaluate_similarity(
    model,
    tok,
    path: str | Path,
    template: str = "{source}\n",
    limit: int | None = None,
    max_new_tokens: int = 64,
    tokenize: str | None = None,
) -> dict:
    """Greedy outputs for each source, scored with BLEU and ROUGE against the references."""
    rows = read_pairs(path, limit)
    hyps = []
    for row in rows:
        ids = ([tok.bos_id] if tok.prepend_bos else []) + tok.encode(
            template.format(source=row["source"])
        )
        ids = fit_prompt(ids, model.cfg.max_seq_len, max_new_tokens, truncate=True)
        text = "".join(stream_text(model, tok, ids, stop=["\n\n"], max_new_tokens=max_new_tokens))
        hyps.append(text.strip())
    refs = [r["reference"] for r in rows]
    return {**bleu(hyps, refs, tokenize), **rouge(hyps, refs), "examples": hyps[:3]}
