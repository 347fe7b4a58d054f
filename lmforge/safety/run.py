"""`lmforge moderate`: train the moderation head, or flag texts with a trained one.

`lmforge moderate train --out DIR` trains (safety/moderation.py); `lmforge moderate DIR TEXT`
or `--file F.jsonl` flags texts. The parser is built here without importing torch, so
`lmforge --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.config import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "moderate",
        help="flag harmful requests / offensive text (en, zh); `moderate train` trains the head",
        description="`lmforge moderate train --out DIR` trains a moderation head on a frozen "
        "encoder's sentence vectors (bundled data: datasets/safety). `lmforge moderate DIR TEXT` "
        'or `--file F.jsonl` (rows with "text") prints per text flagged, score and categories. '
        "See docs/safety.md.",
    )
    add_classifier_args(p, "moderation", "smollm2-135m-instruct", 3000)
    p.add_argument(
        "--threshold",
        type=float,
        help="the flagged cut (default: the model's, picked on val); higher flags less: fewer "
        "safe prompts refused, fewer harmful ones caught (docs/safety.md: operating points)",
    )


def add_classifier_args(p, kind: str, encoder: str, steps: int) -> None:
    """The options `lmforge moderate` and `lmforge injection` share: a model or `train`, a
    TEXT or --file, --json; train's --out, --encoder, --steps."""
    p.add_argument("model", help=f"`train`, or a {kind} model directory made by it")
    p.add_argument("text", nargs="?", help="the text to check (or --file)")
    p.add_argument("--file", help='JSONL file, one object with a "text" field per line')
    p.add_argument("--json", action="store_true", help="print one JSON object per text")
    p.add_argument("--out", help="train: the output directory")
    p.add_argument(
        "--encoder", help=f"train: encoder directory or fetched name (default: {encoder})"
    )
    p.add_argument("--steps", type=int, help=f"train: optimizer steps (default: {steps})")


def texts_of(args) -> list[str]:
    """The TEXT or the --file rows of a check, each checked (empty, too long)."""
    from lmforge.safety.moderation import check_text

    if args.text is not None and args.file:
        raise ConfigError("give a TEXT or --file, not both")
    if args.text is None and not args.file:
        raise ConfigError("nothing to check: give a TEXT or --file F.jsonl")
    return read_texts(args.file) if args.file else [check_text(args.text)]


def read_texts(path: str | Path) -> list[str]:
    """The "text" of every non-blank line (infer/embed.py's reader), each checked (empty, too
    long); a bad line is an error naming file:line."""
    from lmforge.infer.embed import read_rows
    from lmforge.safety.moderation import check_text

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--file {path}: no such file")
    texts, lines = read_rows(path, "text", id_field=None)  # no id field: the line number
    return [check_text(t, f"{path}:{n}") for t, n in zip(texts, lines, strict=True)]


def cmd_moderate(args) -> int:
    if args.model == "train":
        return _train(args)
    texts = texts_of(args)
    from lmforge.safety.moderation import Moderator  # torch only after the input is checked

    results = Moderator(args.model, threshold=args.threshold).moderate(texts)
    for r in results:
        if args.json:
            print(json.dumps(r, ensure_ascii=False))
        else:
            cats = ",".join(r["categories"]) or "-"
            print(f"{'FLAGGED' if r['flagged'] else 'ok'}\t{r['score']:.3f}\t{cats}")
    return 0


def _train(args) -> int:
    if not args.out:
        raise ConfigError("moderate train needs --out DIR")
    if args.text or args.file:
        raise ConfigError("moderate train takes no TEXT or --file (the data is bundled)")
    from lmforge.safety.moderation import config_from, train

    cfg = config_from(args.steps, args.encoder)
    summary = train(cfg, args.out)
    rep = summary["report"]
    print(f"moderation head -> {args.out} (threshold {rep['threshold']}, picked on val)")
    print(format_report(rep))
    return 0


def format_report(rep: dict) -> str:
    """The held-out and XSTest figures as a Markdown table."""
    lines = [
        "| scorer | en P | en R | en F1 | zh P | zh R | zh F1 | XSTest safe flagged | XSTest unsafe flagged |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in ("classifier", "wordlist"):
        r = rep[name]
        cells = [
            f"{r[lang][k]:.3f}" for lang in ("en", "zh") for k in ("precision", "recall", "f1")
        ]
        cells += [f"{r['xstest_safe_flagged']:.3f}", f"{r['xstest_unsafe_flagged']:.3f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    n = rep["n"]
    lines.append(
        f"n: held-out en {n['heldout_en']}, zh {n['heldout_zh']}; XSTest safe "
        f"{n['xstest_safe']}, unsafe {n['xstest_unsafe']}"
    )
    if rep.get("operating_points"):
        lines += ["", "| threshold | en recall | zh recall | XSTest safe flagged | XSTest unsafe flagged |",
                  "| --- | --- | --- | --- | --- |"]  # fmt: skip
        for t, r in rep["operating_points"].items():
            lines.append(f"| {t} | {r['en_recall']:.3f} | {r['zh_recall']:.3f} | "
                         f"{r['xstest_safe_flagged']:.3f} | {r['xstest_unsafe_flagged']:.3f} |")  # fmt: skip
    if rep.get("categories"):
        lines += ["", "| category (held-out, where labelled) | P | R | F1 | positives | n |",
                  "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for name, r in rep["categories"].items():
            lines.append(f"| {name} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} "
                         f"| {r['positives']} | {r['n']} |")  # fmt: skip
    return "\n".join(lines)


# --------------------------------------------------------------------------- lmforge serve


def add_serve_options(p) -> None:
    """`lmforge serve`'s moderation options (serve/moderation.py does the screening)."""
    g = p.add_argument_group("moderation (docs/safety.md)")
    g.add_argument(
        "--moderation-model",
        metavar="DIR",
        help="a model of `lmforge moderate train`: serves /v1/moderations and screens what "
        "--moderation names (loaded at start: a bad directory stops the server at once)",
    )
    g.add_argument(
        "--moderation",
        default="in,out",
        metavar="in,out",
        help="what is screened: in (the user's messages, before the model runs), out (the answer, "
        "released in checked pieces: a flagged one is cut, finish_reason content_filter) or both "
        "(default: in,out)",
    )
    g.add_argument(
        "--moderation-action",
        default="error",
        choices=("error", "refuse"),
        help="flagged input: error = HTTP 400 content_policy_violation in OpenAI's error shape; "
        "refuse = an answer holding --moderation-message (default: error)",
    )
    g.add_argument(
        "--moderation-message",
        default="I can't help with that.",
        help="the refusal sent for flagged input (refuse) and in place of a flagged answer",
    )
    g.add_argument(
        "--moderation-categories",
        metavar="A,B",
        help="refuse only when one of these categories is flagged (default: whenever the text "
        "is flagged); an unknown name is an error listing the model's categories",
    )
    g.add_argument(
        "--moderation-threshold",
        type=float,
        metavar="T",
        help="the flagged cut (default: the model's own); higher refuses fewer safe prompts "
        "and catches fewer harmful ones",
    )
    g.add_argument(
        "--moderation-every",
        type=int,
        default=100,
        metavar="CHARS",
        help="output: characters of the answer held back between two checks (default: 100)",
    )


def parse_where(spec: str) -> tuple[bool, bool]:
    """ "in", "out" or "in,out" -> (screen input, screen output)."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts or any(p not in ("in", "out") for p in parts):
        raise ConfigError(f"--moderation {spec!r}: give in, out or in,out")
    return "in" in parts, "out" in parts


def serve_policy(args) -> dict | None:
    """serve/moderation.py Policy's arguments from the options, or None without
    --moderation-model."""
    if not args.moderation_model:
        if args.moderation_categories:
            raise ConfigError("--moderation-categories needs --moderation-model DIR")
        return None
    screen_in, screen_out = parse_where(args.moderation)
    cats = args.moderation_categories
    return {
        "moderator": args.moderation_model,
        "screen_in": screen_in,
        "screen_out": screen_out,
        "action": args.moderation_action,
        "message": args.moderation_message,
        "categories": tuple(c.strip() for c in cats.split(",") if c.strip()) if cats else None,
        "every": args.moderation_every,
        "threshold": args.moderation_threshold,
    }
