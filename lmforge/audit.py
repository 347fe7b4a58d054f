"""`lmforge scan-sft`: look for planted backdoors and flipped labels in instruction data before
training on it (data/backdoor.py does the finding; this reads the files, prints, and writes a
cleaned copy)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lmforge.config import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "scan-sft",
        help="find suspected backdoor triggers and conflicting duplicates in instruction data "
        "(and write a cleaned copy)",
        description="Scan SFT rows (Alpaca instruction/input/output or OpenAI messages, "
        "JSONL or .jsonl.gz) for phrases in the prompts that almost always come with one fixed "
        "response, far more than that response occurs elsewhere: the shape of a planted "
        "trigger; and for near-duplicate prompts that ask the same question with answers that "
        "disagree: the shape of flipped labels. Prints both with row numbers; --out writes the "
        "rows that are not suspicious. See docs/backdoors.md.",
    )
    p.add_argument("files", nargs="+", help="SFT JSONL files")
    p.add_argument("--out", help="write the rows that are not suspicious here (JSONL)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--min-count", type=int, default=5, help="examples an n-gram needs (default: 5)")
    p.add_argument("--min-share", type=float, default=0.8,
                   help="share of those examples with one response (default: 0.8)")  # fmt: skip
    p.add_argument("--min-lift", type=float, default=20.0,
                   help="that share over the response's overall rate (default: 20)")  # fmt: skip
    p.add_argument("--dup-threshold", type=float, default=0.7,
                   help="estimated Jaccard similarity of two prompts' word-pair shingles that "
                   "makes them near duplicates (default: 0.7)")  # fmt: skip


def read_pairs(files: list[str]) -> tuple[list[dict], list[tuple[str, str]]]:
    """(rows, (prompt, response) per row); a bad row is an error naming file:line and why."""
    from lmforge.align.sft import row_to_messages
    from lmforge.data.readers import iter_lines

    rows, pairs = [], []
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"{name}: no such file")
        for lineno, line in iter_lines(path):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                messages = row_to_messages(row)
            except ValueError as e:
                raise ConfigError(f"{name}:{lineno}: {e}") from None
            prompt = "\n".join(m["content"] for m in messages if m["role"] != "assistant")
            response = "\n".join(m["content"] for m in messages if m["role"] == "assistant")
            rows.append(row)
            pairs.append((prompt, response))
    return rows, pairs


def _conflicts(pairs: list[tuple[str, str]], threshold: float) -> list:
    """The conflicting near-duplicate sets, or none with a note when datasketch (the `data`
    extra, which `lmforge clean` also needs) is missing: the trigger scan still runs."""
    from lmforge.data.backdoor import conflicts

    try:
        import datasketch  # noqa: F401
    except ImportError:
        print("scan-sft: conflicting duplicates not checked: they need datasketch "
              "(pip install 'lmforge[data]')", file=sys.stderr)  # fmt: skip
        return []
    return conflicts(pairs, threshold=threshold)


def _snippet(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _conflict_json(c, pairs) -> dict:
    return {"rows": c.rows, "groups": c.groups, "minority": c.minority,
            "prompt": _snippet(pairs[c.rows[0]][0], 200),
            "responses": [_snippet(pairs[g[0]][1], 200) for g in c.groups]}  # fmt: skip


def cmd_scan_sft(args) -> int:
    from lmforge.data.backdoor import scan, suspicious_rows

    if args.min_count < 2 or not 0 < args.min_share <= 1 or args.min_lift <= 1:
        raise ConfigError("--min-count must be >= 2, 0 < --min-share <= 1 and --min-lift > 1")
    if not 0 < args.dup_threshold <= 1:
        raise ConfigError(f"--dup-threshold must be in (0, 1], got {args.dup_threshold}")
    rows, pairs = read_pairs(args.files)
    triggers = scan(pairs, min_count=args.min_count, min_share=args.min_share,
                    min_lift=args.min_lift)  # fmt: skip
    found = _conflicts(pairs, args.dup_threshold)
    # every row of a conflicting set is left out, the majority's too: a poisoner who plants
    # more copies than the question has honest rows would win a vote
    bad = suspicious_rows(triggers) | {i for c in found for i in c.rows}
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            for i, row in enumerate(rows):
                if i not in bad:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    if args.json:
        trig = [{"ngram": t.ngram, "count": t.count, "share": t.share, "lift": t.lift,
                 "response": t.response, "rows": t.rows} for t in triggers]  # fmt: skip
        print(json.dumps({"rows": len(rows), "suspicious": len(bad), "triggers": trig,
                          "conflicts": [_conflict_json(c, pairs) for c in found]},
                         ensure_ascii=False))  # fmt: skip
        return 0
    print(f"{len(rows)} rows, {len(triggers)} suspected triggers, {len(found)} conflicting "
          f"near-duplicate sets, {len(bad)} suspicious rows")  # fmt: skip
    for t in triggers:
        print(f"  {t.ngram!r}: in {t.count} prompts, {t.share:.0%} answered "
              f"{t.response[:60]!r} (lift {t.lift})")  # fmt: skip
    for c in found[:20]:
        answers = " / ".join(f"{_snippet(pairs[g[0]][1], 40)!r} (rows {g})" for g in c.groups)
        print(f"  rows {c.rows}: {_snippet(pairs[c.rows[0]][0])!r} answered {answers}; "
              f"minority: {c.minority or 'none (a tie)'}")  # fmt: skip
    if len(found) > 20:
        print(f"  ... and {len(found) - 20} more conflicting sets (--json lists all)")
    if args.out:
        print(f"wrote {len(rows) - len(bad)} rows to {args.out}", file=sys.stderr)
    return 0
