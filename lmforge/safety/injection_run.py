"""`lmforge injection`: train the prompt-injection classifier, or score texts with a trained one.

`lmforge injection train --out DIR` trains (safety/injection_clf.py); `lmforge injection DIR
TEXT` or `--file F.jsonl` scores texts. The parser is built here without importing torch, so
`lmforge --help` stays fast.
"""

from __future__ import annotations

import json

from lmforge.config import ConfigError
from lmforge.safety.run import add_classifier_args, texts_of


def add_parser(sub) -> None:
    p = sub.add_parser(
        "injection",
        help="flag prompt injections in untrusted text; `injection train` trains the classifier",
        description="`lmforge injection train --out DIR` trains a prompt-injection head on a "
        "frozen encoder's sentence vectors (bundled data: datasets/injection, the train files). "
        '`lmforge injection DIR TEXT` or `--file F.jsonl` (rows with "text") prints per text '
        "flagged and score (a long text: its worst window). `rag ask`, `agent` and `serve` take "
        "it as --injection-model DIR. See docs/injection.md.",
    )
    add_classifier_args(p, "injection", "all-minilm-l6-v2", 2000)
    p.add_argument(
        "--window",
        type=int,
        help="train: tokens per window a text is scored by, its worst window counting (default: "
        "64; 0: the first 256 tokens of a text, whole)",
    )


def cmd_injection(args) -> int:
    if args.model == "train":
        return _train(args)
    texts = texts_of(args)
    from lmforge.safety.injection_clf import InjectionClassifier  # torch after the input checks

    for r in InjectionClassifier(args.model).classify(texts):
        if args.json:
            print(json.dumps(r))
        else:
            print(f"{'FLAGGED' if r['flagged'] else 'ok'}\t{r['score']:.3f}")
    return 0


def _train(args) -> int:
    if not args.out:
        raise ConfigError("injection train needs --out DIR")
    if args.text or args.file:
        raise ConfigError("injection train takes no TEXT or --file (the data is bundled)")
    from lmforge.safety.injection_clf import config_from, train

    summary = train(config_from(args.steps, args.encoder, args.window), args.out)
    rep = summary["report"]
    val = rep["val"]
    print(
        f"injection head -> {args.out} (threshold {rep['threshold']}, picked on val; val "
        f"precision {val['precision']:.3f} recall {val['recall']:.3f} F1 {val['f1']:.3f}, "
        f"n {val['n']})"
    )
    return 0
