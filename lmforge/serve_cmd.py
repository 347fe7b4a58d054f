"""`lmforge serve`: its options and the command (the server itself is lmforge/serve/).

Kept apart from commands.py for size: the server has the most options of any command.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lmforge.config import ConfigError
from lmforge.safety.run import add_serve_options, serve_policy

MEMORY = ("drop", "summary", "retrieve")  # infer/memory.py's STRATEGIES (not imported at start-up)


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
    from lmforge.serve.retrieval import parse_specs

    policy = serve_policy(args)  # its option errors first, the moderation model at create_app
    from lmforge.serve.moderation import Policy

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
        rag_indexes=parse_specs(args.rag),
        memory=args.memory,
        redact_pii=args.redact_pii,
        moderation=Policy(**policy) if policy else None,
        injection_model=args.injection_model,
    )
    return serve(
        app, args.host, args.port, max_connections=args.max_connections, log_level=args.log_level
    )


def add_serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API, with a web chat page",
        description="Serve a model directory (or LoRA adapter directory) at /v1/chat/completions, "
        "/v1/completions and /v1/models, OpenAI-compatible (streaming included), with /health and "
        "a web chat page at /. Requests are decoded together by the continuous-batching engine. "
        "Needs the serve extra: pip install 'lmforge[serve]'.",
    )
    p.add_argument("checkpoint", help="model directory, or a LoRA adapter directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument(
        "--api-key-file",
        default=None,
        metavar="PATH",
        help="require 'Authorization: Bearer KEY' on /v1/*, KEY read from this file's first line "
        "(default: $LMFORGE_API_KEY, or no key)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="the key itself; other local users can read it in the process list, so prefer "
        "--api-key-file or $LMFORGE_API_KEY",
    )
    p.add_argument(
        "--served-model-name",
        "--model-name",
        dest="model_name",
        default=None,
        metavar="NAME",
        help="model id clients use and /v1/models shows (default: the checkpoint directory's "
        "name; the path as given is accepted too)",
    )
    p.add_argument(
        "--max-batch", type=int, default=8, help="requests decoded together (default: 8)"
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="requests waiting for a slot before new ones get 429 (default: 64)",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=1024,
        help="largest max_tokens a request may ask for, and the default (default: 1024)",
    )
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=1 << 20,
        help="largest request body; bigger ones get 413 (default: 1048576)",
    )
    p.add_argument(
        "--allowed-hosts",
        default=None,
        metavar="HOSTS",
        help="comma-separated Host names the server answers to, * = any (default: when bound to "
        "a loopback address, 127.0.0.1, localhost and ::1 only, against DNS rebinding; "
        "otherwise any)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=256,
        help="open connections; more are answered 503 and closed (default: 256)",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=30.0,
        help="seconds for a request's header, and again for its body, to arrive; slower "
        "connections are dropped (default: 30)",
    )
    p.add_argument(
        "--embedding-model",
        default=None,
        metavar="DIR",
        help="answer /v1/embeddings with this model (an encoder such as `lmforge fetch "
        "all-minilm-l6-v2`, or a causal model, mean-pooled); without it /v1/embeddings is 404",
    )
    p.add_argument(
        "--rag",
        action="append",
        metavar="NAME=INDEX",
        help="an `lmforge rag index` folder a chat request may name as "
        '`"retrieval": {"index": NAME}` to be answered from its chunks, with the sources in '
        "the response (repeatable; the index's encoder is loaded at start)",
    )
    p.add_argument(
        "--memory",
        default=None,
        choices=MEMORY,
        help="a chat request too long for the context (its answer's room included): drop its "
        "oldest turns; summary: the model summarises them (one more generation); retrieve: the "
        "old turns matching the last user message come back as a note. The response's "
        "x-lmforge-memory header says what happened (default: none: such a request is served "
        "as before, a 400 context_length_exceeded when its prompt does not fit at all)",
    )
    p.add_argument(
        "--redact-pii",
        action="store_true",
        help="replace e-mails, phones, IPs, card numbers and national IDs in the model's answers "
        "with <EMAIL>, <PHONE>, ... (the `pii` clean step's rules), streamed answers too: the "
        "text a match could still be growing into is held back until it is decided",
    )
    p.add_argument(
        "--injection-model",
        metavar="DIR",
        help="a trained injection classifier (`lmforge injection train`): a request's "
        '`"retrieval": {"defence": "detect"|"both"}` holds back the chunks it or the rules flag',
    )
    add_serve_options(p)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default: auto)")
    p.add_argument(
        "--no-batch-invariance",
        action="store_true",
        help="decode only the busy slots: 2-3x faster for a lone request on a CPU, but a greedy "
        "answer may then differ on a near-tie depending on what else is running",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="info logs one line per request (default: info)",
    )
