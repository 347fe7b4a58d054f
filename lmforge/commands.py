"""The commands that act on one model or model file: `generate`, `chat`, `export`, `import`,
`serve`, `eval`, `fetch`, `embed` and `rag`. `cli.py` parses their options and calls `cmd_NAME(args)`; each returns the exit
code and raises ConfigError for bad input (printed by `cli.main` as one line).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lmforge.config import ConfigError


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


def cmd_chat(args) -> int:
    from lmforge.infer.chat import run_chat
    from lmforge.model.load import load
    from lmforge.perf import pick_device

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    model, tok = load(args.checkpoint, device=pick_device(args.device))
    run_chat(
        model,
        tok,
        system=args.system,
        reserve=args.max_new_tokens,
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


def resolve_api_key(key: str | None, key_file: str | None, environ) -> tuple[str | None, str]:
    """The server's API key and where it came from: --api-key-file, then --api-key (warned
    about: /proc/PID/cmdline is readable by every local user and by sandboxed code), then
    $LMFORGE_API_KEY; (None, "") for no key. An unreadable or empty key file is an error."""
    if key_file is not None and key is not None:
        raise ConfigError("pass --api-key-file or --api-key, not both")
    if key_file is not None:
        try:
            lines = Path(key_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--api-key-file {key_file}: cannot read it ({e})") from None
        found = lines[0].strip() if lines else ""
        if not found:
            raise ConfigError(
                f"--api-key-file {key_file}: the file is empty (the key goes on line 1)"
            )
        return found, f"--api-key-file {key_file}"
    if key is not None:
        if not key.strip():
            raise ConfigError("--api-key is empty")
        return key.strip(), "--api-key"
    env = environ.get("LMFORGE_API_KEY", "").strip()
    return (env, "$LMFORGE_API_KEY") if env else (None, "")


def cmd_serve(args, rest) -> int:
    import logging

    if rest:
        raise ConfigError(f"unrecognized arguments: {' '.join(rest)}")
    api_key, source = resolve_api_key(args.api_key, args.api_key_file, os.environ)
    if source == "--api-key":
        print(
            "warning: --api-key is visible to every local user in the process list; "
            "use --api-key-file or $LMFORGE_API_KEY",
            file=sys.stderr,
        )
    from lmforge.serve.app import create_app, serve

    level = args.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s")
    hosts = args.allowed_hosts
    app = create_app(
        args.checkpoint,
        args.model_name,
        api_key=api_key,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_tokens=args.max_tokens,
        max_request_bytes=args.max_request_bytes,
        device=args.device,
        batch_invariant=not args.no_batch_invariance,
        allowed_hosts=hosts.split(",") if hosts is not None else None,
        request_timeout=args.request_timeout,
        embedding_model=args.embedding_model,
    )
    return serve(
        app, args.host, args.port, max_connections=args.max_connections, log_level=args.log_level
    )


def cmd_eval(args) -> int:
    from lmforge.eval import run as evaluation

    if args.compare:
        print(evaluation.compare(*args.compare))
        return 0
    if not args.checkpoint:
        raise ConfigError("name a CHECKPOINT to evaluate, or pass --compare A B")
    tasks = [t for t in args.tasks.split(",") if t]
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "eval"
    rows = evaluation.run(
        args.checkpoint, tasks, out, args.limit, args.seed, unsafe_exec=args.unsafe_exec,
        split=args.split, num_fewshot=args.num_fewshot, log_samples=args.log_samples,
    )  # fmt: skip
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


def cmd_rag(args) -> int:
    from lmforge.rag import run

    return getattr(run, f"cmd_{args.rag_command}")(args)
