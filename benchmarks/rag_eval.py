"""Retrieval and grounded answers on SQuAD v2: does `lmforge rag` find the passage, and does a
small model answer from it, cite it, and abstain when the passages do not hold the answer?

The regime: 418 SQuAD v2.0 dev questions (204 answerable, 214 unanswerable: written against a
passage that does not answer them) over all 173 passages of five articles plus 122 long
Wikipedia articles as distractors (datasets/rag/). Recall@k counts a question as found when one
of the top k chunks comes from its passage (`passage_id`); it is reported for BM25, and for dense
and fused (RRF) rankings when an --encoder is given. With --model, the model answers each
question from the top --ask-k chunks (`lmforge rag ask`), and again without retrieval (the same
model, no sources), scored by SQuAD exact match and token F1 on answerable questions, the rate
of correct abstention on unanswerable ones, and citation accuracy (of the answered answerable
questions that cite a source, the share whose cited chunks contain a reference answer).

    python benchmarks/rag_eval.py                                   # BM25 recall (a minute)
    python benchmarks/rag_eval.py --encoder ENC                      # + dense and fused
    python benchmarks/rag_eval.py --model ~/.cache/lmforge/models/smollm2-135m-instruct --limit 100
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import string
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, print_json, print_table  # noqa: E402

from lmforge.rag.answer import NO_ANSWER, abstains, ask  # noqa: E402
from lmforge.rag.index import build_index, terms  # noqa: E402
from lmforge.rag.run import load_embedder  # noqa: E402
from lmforge.rag.search import Index, rrf, top  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KS = (1, 5, 20)
NO_RAG_SYSTEM = (
    "Answer the question with a short phrase. If you do not know, reply exactly: I do not know."
)


# --- SQuAD scoring (the official script's normalisation: lower case, no punctuation or articles)
def squad_norm(text: str) -> str:
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def f1(pred: str, gold: str) -> float:
    p, g = squad_norm(pred).split(), squad_norm(gold).split()
    common = sum((collections.Counter(p) & collections.Counter(g)).values())
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(g)
    return 2 * prec * rec / (prec + rec)


def strip_citations(answer: str) -> str:
    return re.sub(r"\s*\[\d+\]", "", answer).strip()


# --- retrieval
def rankings(index: Index, question: str, embedder) -> dict[str, list[int]]:
    """Chunk rows best first, per retriever (the thresholds of `rag query`'s defaults)."""
    q = terms(question)
    bm25 = index.bm25.get_scores(q) if q else np.zeros(len(index.rows))
    out = {"bm25": top(bm25, 0.0)}
    if embedder is not None:
        dense = index.dense @ np.asarray(embedder.embed([question]), dtype=np.float32)[0]
        out["dense"] = top(dense, 0.3)
        fused = rrf([out["bm25"], out["dense"]])
        out["fused"] = sorted(fused, key=lambda i: (-fused[i], i))
    return out


def recall_table(index: Index, qa: list[dict], embedder) -> dict:
    found = collections.defaultdict(lambda: collections.defaultdict(list))
    for row in qa:
        for name, ranked in rankings(index, row["question"], embedder).items():
            docs = [index.rows[i][0] for i in ranked[: max(KS)]]
            for k in KS:
                hit = row["passage_id"] in docs[:k]
                found[name][("all", k)].append(hit)
                if not row["is_impossible"]:
                    found[name][("answerable", k)].append(hit)
    return {
        name: {f"{s}@{k}": float(np.mean(v)) for (s, k), v in d.items()}
        for name, d in found.items()
    }


# --- answers
def answer_without_retrieval(model, tok, question: str, max_new_tokens: int) -> str:
    from lmforge.infer.chat import answer

    msgs = [{"role": "system", "content": NO_RAG_SYSTEM}, {"role": "user", "content": question}]
    return "".join(answer(model, tok, msgs, max_new_tokens=max_new_tokens, temperature=0.0)).strip()


def score_answers(rows: list[dict]) -> dict:
    """EM/F1 on answerable, correct abstention on unanswerable, citation accuracy."""
    ans = [r for r in rows if not r["is_impossible"]]
    una = [r for r in rows if r["is_impossible"]]
    em = [
        max(float(squad_norm(r["pred"]) == squad_norm(g)) for g in r["golds"])
        if not r["abstained"]
        else 0.0
        for r in ans
    ]
    f = [max(f1(r["pred"], g) for g in r["golds"]) if not r["abstained"] else 0.0 for r in ans]
    # lenient: a reference answer appears inside the (often wordy) answer
    contains = [
        not r["abstained"] and any(squad_norm(g) in squad_norm(r["pred"]) for g in r["golds"])
        for r in ans
    ]
    cited = [r for r in ans if not r["abstained"] and r.get("cited_texts")]
    good = [
        any(squad_norm(g) in squad_norm(t) for g in r["golds"] for t in r["cited_texts"])
        for r in cited
    ]
    return {
        "n_answerable": len(ans),
        "EM": float(np.mean(em)) if ans else None,
        "F1": float(np.mean(f)) if ans else None,
        "contains_gold": float(np.mean(contains)) if ans else None,
        "abstain_answerable": float(np.mean([r["abstained"] for r in ans])) if ans else None,
        "n_unanswerable": len(una),
        "correct_abstention": float(np.mean([r["abstained"] for r in una])) if una else None,
        "answers_citing": len(cited),
        "citation_accuracy": float(np.mean(good)) if good else None,
    }


def run_answers(index, qa, embedder, model_dir, ask_k, max_new_tokens, log_path) -> dict:
    from lmforge.model.load import load

    model, tok = load(model_dir)
    rag_rows, bare_rows = [], []
    with open(log_path, "w", encoding="utf-8") as log:
        for n, row in enumerate(qa, 1):
            golds = [a["text"] for a in row["answers"]]
            base = {"is_impossible": row["is_impossible"], "golds": golds}
            hits = index.search(row["question"], ask_k, embedder)
            out = ask(model, tok, row["question"], hits, max_new_tokens)
            texts = [c["text"] for c in out["citations"]]
            rag_rows.append(
                {
                    **base,
                    "pred": strip_citations(out["answer"]),
                    "abstained": out["abstained"],
                    "cited_texts": texts,
                }
            )
            bare = answer_without_retrieval(model, tok, row["question"], max_new_tokens)
            bare_rows.append({**base, "pred": bare, "abstained": abstains(bare)})
            log.write(json.dumps({"id": row["id"], "rag": out["model_answer"], "bare": bare,
                                  "rag_cited_texts": texts, **base}) + "\n")  # fmt: skip
            log.flush()
            print(
                f"[{n}/{len(qa)}] {row['question'][:60]!r}: rag {out['answer'][:50]!r} | bare {bare[:40]!r}",
                flush=True,
            )
    return {"rag": score_answers(rag_rows), "no_retrieval": score_answers(bare_rows)}


def rescore(log_path: str) -> dict:
    """The answer scores again from an answers.jsonl log (no model run): the wordy answers
    can be scored another way without hours of generation."""
    rag_rows, bare_rows = [], []
    for line in open(log_path, encoding="utf-8"):
        row = json.loads(line)
        base = {"is_impossible": row["is_impossible"], "golds": row["golds"]}
        said = row["rag"] or NO_ANSWER  # None: nothing was retrieved, the model was not run
        rag_rows.append({**base, "pred": strip_citations(said), "abstained": abstains(said),
                         "cited_texts": row.get("rag_cited_texts", [])})  # fmt: skip
        bare_rows.append({**base, "pred": row["bare"], "abstained": abstains(row["bare"])})
    return {"rag": score_answers(rag_rows), "no_retrieval": score_answers(bare_rows)}


def print_answers(answers: dict) -> None:
    keys = list(answers["rag"])
    print_table(
        ["setting", *keys],
        [[k, *[v[x] if v[x] is not None else "-" for x in keys]] for k, v in answers.items()],
    )


def time_exact_search(sizes=(4_000, 100_000, 500_000), dim=384, repeats=20) -> dict:
    """Milliseconds per query of exact dense search (matrix-vector product, top-100 selection)
    on random unit vectors: where exact search stops being good enough."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal(dim).astype(np.float32)
    out = {}
    for n in sizes:
        m = rng.standard_normal((n, dim)).astype(np.float32)
        m @ q  # warm up
        t = time.perf_counter()
        for _ in range(repeats):
            s = m @ q
            np.argpartition(-s, 100)[:100]
        out[n] = 1000 * (time.perf_counter() - t) / repeats
        print(f"exact search, {n:,} x {dim} float32 ({m.nbytes / 2**20:.0f} MiB): {out[n]:.1f} ms")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", default=str(ROOT / "datasets/rag/docs"))
    p.add_argument("--qa", default=str(ROOT / "datasets/rag/qa/squad_v2_dev_qa.jsonl.gz"))
    p.add_argument(
        "--index", default=str(ROOT / "runs/rag-eval/index"), help="built or updated here"
    )
    p.add_argument("--encoder", help="encoder directory: adds dense and fused recall")
    p.add_argument("--model", help="chat model directory: adds answer quality")
    p.add_argument(
        "--limit", type=int, default=0, help="first N questions for the answers (0: all)"
    )
    p.add_argument("--ask-k", type=int, default=3, help="chunks in the answer prompt")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--max-tokens", type=int, default=200, help="chunk size")
    p.add_argument("--overlap", type=int, default=40)
    p.add_argument("--exact-timing", action="store_true", help="only time exact dense search")
    p.add_argument("--rescore", metavar="ANSWERS_JSONL", help="only score a logged run again")
    args = p.parse_args()
    if args.rescore:
        answers = rescore(args.rescore)
        print_answers(answers)
        print_json(
            "rag_eval_rescore", environment(torch.device("cpu"), torch.float32), answers=answers
        )
        return
    if args.exact_timing:
        env = environment(torch.device("cpu"), torch.float32)
        print_json("rag_exact_search", env, ms_per_query=time_exact_search())
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    qa = [json.loads(line) for line in gzip.open(args.qa, "rt", encoding="utf-8")]
    embedder = load_embedder(args.encoder)

    t = time.perf_counter()
    stats = build_index([args.docs], args.index, embedder, args.max_tokens, args.overlap)
    index_s = time.perf_counter() - t
    index = Index(args.index)
    print(f"index: {stats.docs} documents, {stats.chunks} chunks, {index_s:.1f} s")
    t = time.perf_counter()
    recall = recall_table(index, qa, embedder)
    query_ms = 1000 * (time.perf_counter() - t) / len(qa)
    print_table(
        ["retriever", *[f"R@{k} answerable" for k in KS], *[f"R@{k} all" for k in KS]],
        [
            [name, *[r[f"answerable@{k}"] for k in KS], *[r[f"all@{k}"] for k in KS]]
            for name, r in recall.items()
        ],
    )
    numbers = {
        "questions": len(qa),
        "chunks": stats.chunks,
        "recall": recall,
        "query_ms": round(query_ms, 2),
    }
    if args.model:
        sub = qa[: args.limit] if args.limit else qa
        log = Path(args.index).parent / "answers.jsonl"
        answers = run_answers(
            index, sub, embedder, args.model, args.ask_k, args.max_new_tokens, log
        )
        print_answers(answers)
        numbers["answers"] = answers
        numbers["answers_log"] = str(log)
    print_json("rag_eval", environment(torch.device("cpu"), torch.float32), **numbers)


if __name__ == "__main__":
    main()
