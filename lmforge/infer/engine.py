"""The inference engine: many requests decoded together, joining and leaving as they come.

The one idea (continuous batching): the KV cache has `max_batch` slots. A request waits in a
queue until a slot is free, is prefilled alone into that slot, then advances one token per
engine step together with every other running request in one batched forward; a request that
finishes frees its slot at once for the next in the queue. Rows sit at different positions, so
the batched step gathers each row's rotary angles and masks each row's keys by its own length.

Greedy results do not depend on the company a request keeps (`batch_invariant`, the default):
the decode step always runs all `max_batch` rows (idle rows compute on a dummy token), so a
row's matmuls have the same shape and the same rounding whether it runs alone or in a full
batch (tests/infer/test_engine.py checks this against requests run one at a time). The price
is paid at low load: on 2 CPU cores an 8-row product streams the weights at about half the
rate of a one-row product, so one request alone decodes ~2-3x slower than with
batch_invariant=False, which runs only the rows up to the last busy slot.

One request never stops the engine: anything that raises while serving it (its seed, prefill,
sampling or callback) ends that request alone with finish_reason "error" and `error` set; a
failing batched forward fails the rows in it; the loop itself logs and goes on.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lmforge.config import ConfigError
from lmforge.infer.constrain import Constraint
from lmforge.infer.cpu_decode import CpuDecoder, relayout
from lmforge.infer.generate import (
    TextStream,
    apply_repetition_penalty,
    ban_tokens,
    banned_mask,
    sample_next,
    special_ids,
)
from lmforge.model.lora import LoRALinear
from lmforge.model.mamba import Mamba
from lmforge.model.moe import MoE
from lmforge.model.transformer import GPT, KVCache, apply_rope

log = logging.getLogger("lmforge.infer.engine")


class QueueFull(RuntimeError):
    """The engine's waiting queue is at its limit; the caller should retry later (HTTP 429)."""


@dataclass
class SamplingParams:
    max_tokens: int = 64  # new tokens at most
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()  # stop strings (not included in the output)
    stop_ids: Sequence[int] = ()  # stop tokens (not included in the output)
    logprobs: bool = False  # record the model's log-probability of each chosen token
    grammar: str | None = None  # constrained decoding: infer/constrain.py's json_grammar(schema)


@dataclass
class Request:
    """One generation. `on_event(request, piece, done)` is called from the engine thread with
    each new text piece, and once with done=True at the end (`finish_reason` is then set:
    "stop" for a stop token or string, "length", "cancelled" or "error")."""

    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[Request, str, bool], None] | None = None
    id: str = ""
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_token: int | None = None  # the stop id that ended it (not in output_ids)
    error: str | None = None
    created: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        """Ask the engine to stop this request; its slot is freed at the next step."""
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def done(self) -> bool:
        return self._done.is_set()


class _Slot:
    """A running request: its cache row, next position, text stream and sampler state."""

    def __init__(self, req: Request, tokenizer, vocab: int, device, specials: Sequence[int]):
        self.req, self.pos = req, len(req.prompt_ids)
        self.prompt_len = self.pos
        # no tokenizer (token-level use, e.g. benchmarks): ids only, no text and no stop strings
        self.stream = TextStream(tokenizer, req.params.stop) if tokenizer is not None else None
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(req.params.seed if req.params.seed is not None else time.time_ns())
        self.seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)
        self.seen[0, req.prompt_ids] = True
        # special tokens are not text: never sampled, except the stop ids that end the reply
        self.banned = banned_mask(specials, req.params.stop_ids, vocab, device)
        grammar, stop_ids = req.params.grammar, req.params.stop_ids
        self.constraint = Constraint(tokenizer, grammar, vocab, stop_ids) if grammar else None


class Engine:
    """Continuous batching over one model. Use `submit` + `start` (a background thread), or
    `run_until_done` for a synchronous batch."""

    def __init__(
        self,
        model: GPT,
        tokenizer,
        max_batch: int = 8,
        max_queue: int = 64,
        batch_invariant: bool = True,
    ):
        if max_batch < 1 or max_queue < 0:
            raise ConfigError("max_batch must be >= 1 and max_queue >= 0")
        if isinstance(model, Mamba):  # the engine's rows and positions index a KVCache
            raise ConfigError(
                "the serving engine does not batch a Mamba yet (no per-row recurrent state); "
                "it decodes with `lmforge generate` or `lmforge chat`"
            )
        self.model, self.tokenizer = model.eval(), tokenizer
        self.cfg = model.cfg
        self.max_batch, self.max_queue = max_batch, max_queue
        # True: every decode step runs all max_batch rows, so a request's greedy output never
        # depends on the others; False: only rows up to the last busy slot (faster when few
        # requests run; a near-tie between two logits may then resolve differently)
        self.batch_invariant = batch_invariant
        self.device = model.device
        self.cache = model.new_cache(max_batch)
        self.specials = special_ids(tokenizer, self.cfg.vocab_size) if tokenizer is not None else []
        self.linears = BlockedLinears(model)
        # one busy row without batch invariance: the batch-1 CPU decode step, the fastest path
        supported = self.device.type == "cpu" and CpuDecoder.supports(model)
        self.solo = CpuDecoder(model) if supported and not batch_invariant else None
        self.slots: list[_Slot | None] = [None] * max_batch
        self.waiting: queue.Queue[Request] = queue.Queue()
        self._ids = itertools.count(1)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lock = threading.Lock()

    # --- requests

    def submit(
        self, prompt_ids: Sequence[int], params: SamplingParams, on_event=None, request_id=""
    ) -> Request:
        """Queue a request (raises ConfigError for a bad one, QueueFull when the queue is full)."""
        prompt_ids = list(prompt_ids)
        if not prompt_ids:
            raise ConfigError("the prompt is empty")
        if len(prompt_ids) >= self.cfg.max_seq_len:
            raise ConfigError(
                f"the prompt has {len(prompt_ids)} tokens but the model's context is "
                f"{self.cfg.max_seq_len} (and at least one new token must fit)"
            )
        if params.max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {params.max_tokens}")
        bad = [i for i in prompt_ids if not 0 <= i < self.cfg.vocab_size]
        if bad:
            raise ConfigError(f"token id {bad[0]} is outside the vocabulary")
        with self.lock:
            if self.waiting.qsize() >= self.max_queue and all(self.slots):
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            req = Request(prompt_ids, params, on_event, request_id or f"req-{next(self._ids)}")
            self.waiting.put(req)
        self._wake.set()
        return req

    def active(self) -> int:
        return sum(s is not None for s in self.slots)

    def pending(self) -> int:
        return self.waiting.qsize()

    # --- the loop

    def start(self) -> None:
        """Run steps in a background thread until `shutdown`."""
        self._thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
        self._thread.start()

    def is_alive(self) -> bool:
        """Whether the background thread is running steps: False before `start`, after
        `shutdown`, or once it has died."""
        return self._thread is not None and self._thread.is_alive()

    def shutdown(self, cancel: bool = False, timeout: float | None = None) -> None:
        """Stop the loop: first finish (or, with cancel, cancel) running and waiting requests."""
        if cancel:
            self.cancel_all()
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def cancel_all(self) -> None:
        for s in self.slots:
            if s is not None:
                s.req.cancel()
        for req in list(self.waiting.queue):
            req.cancel()

    def _loop(self) -> None:
        while True:
            try:
                busy = self.step()
            except Exception as e:  # not one request's fault (those are caught in step)
                log.exception("an engine step failed; failing the running requests")
                for i, s in enumerate(self.slots):
                    if s is not None:
                        self._fail(i, s.req, e)
                busy = True
            if not busy:
                if self._stop.is_set():
                    return
                self._wake.wait(0.05)
                self._wake.clear()

    def run_until_done(self) -> None:
        """Step until no request is running or waiting (synchronous use and tests)."""
        while self.step():
            pass

    @torch.inference_mode()
    def step(self) -> bool:
        """Admit waiting requests into free slots, advance every running request by one token,
        and refill the slots that frees. Returns whether there was anything to do."""
        self._admit()
        rows = [i for i, s in enumerate(self.slots) if s is not None]
        if not rows:
            return not self.waiting.empty()
        for i in rows:
            if self.slots[i].req._cancel.is_set():
                self._finish(i, "cancelled")
        rows = [i for i, s in enumerate(self.slots) if s is not None]
        if rows:
            n = self.max_batch if self.batch_invariant else rows[-1] + 1
            tokens = torch.zeros(n, dtype=torch.long, device=self.device)
            pos = torch.zeros(n, dtype=torch.long, device=self.device)
            for i in rows:
                tokens[i] = self.slots[i].req.output_ids[-1]
                pos[i] = self.slots[i].pos
            try:
                logits = self._forward(rows, n, tokens, pos)
            except Exception as e:  # the shared forward: every row in it fails, the loop goes on
                log.exception("the batched decode step failed")
                for i in rows:
                    self._fail(i, self.slots[i].req, e)
                rows = []
            for i in rows:
                slot = self.slots[i]
                slot.pos += 1
                try:
                    self._accept(i, logits[i : i + 1])
                except Exception as e:  # this request's sampling or callback: only it ends
                    self._fail(i, slot.req, e)
        self._admit()  # slots freed in this step take waiting requests now, not a step later
        return True

    def _forward(self, rows: list[int], n: int, tokens, pos) -> torch.Tensor:
        """Logits (n, V) of one decode step over the first n cache rows."""
        if self.solo is not None and len(rows) == 1:
            i = rows[0]
            step = self.solo.step(tokens[i : i + 1], self.cache.rows(i, 1), int(pos[i]))
            logits = torch.zeros(n, step.shape[-1], device=self.device)
            logits[i] = step
            return logits
        cache = self.cache if n == self.max_batch else self.cache.rows(0, n)
        return decode_step(self.model, tokens, pos, cache, self.linears)

    def _admit(self) -> None:
        for i in range(self.max_batch):
            if self.slots[i] is not None:
                continue
            try:
                req = self.waiting.get_nowait()
            except queue.Empty:
                return
            if req._cancel.is_set():
                self._finish_request(req, "cancelled")
                continue
            try:  # a failing request (seed, prefill, sampling) must not take the engine down
                self.slots[i] = _Slot(
                    req, self.tokenizer, self.cfg.vocab_size, self.device, self.specials
                )
                ids = torch.tensor([req.prompt_ids], device=self.device)
                logits = self.model(ids, self.cache.rows(i, 1), 0, last_only=True)[:, -1]
                self._accept(i, logits)
            except Exception as e:
                self._fail(i, req, e)

    def _accept(self, i: int, logits: torch.Tensor) -> None:
        """Sample the next token of slot i from its logits (1, V); emit it or finish."""
        slot = self.slots[i]
        req, p = slot.req, slot.req.params
        raw = logits
        logits = apply_repetition_penalty(logits, slot.seen, p.repetition_penalty)
        logits = ban_tokens(logits, slot.banned)
        if slot.constraint is not None:  # only tokens that keep the output inside the grammar
            logits = ban_tokens(logits, slot.constraint.banned(logits.device))
        nxt = sample_next(logits, p.temperature, p.top_k, p.top_p, slot.gen)
        tok = int(nxt.item())
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
        if tok in p.stop_ids:
            req.stop_token = tok
            self._finish(i, "stop")
            return
        req.output_ids.append(tok)
        slot.seen[0, tok] = True
        if slot.constraint is not None:
            slot.constraint.advance(tok)
        if p.logprobs:  # the model's own distribution, as vLLM and OpenAI report it: before
            # the repetition penalty, the ban of special tokens and the temperature
            req.logprobs.append(F.log_softmax(raw.float(), dim=-1)[0, tok].item())
        piece = slot.stream.push(tok) if slot.stream else ""
        if piece and req.on_event:
            req.on_event(req, piece, False)
        if slot.stream and slot.stream.stopped:
            self._finish(i, "stop")
        elif slot.constraint is not None and slot.constraint.finished:
            self._finish(i, "stop")  # the JSON is complete: nothing but a stop token may follow
        elif len(req.output_ids) >= min(p.max_tokens, self.cfg.max_seq_len - slot.prompt_len):
            self._finish(i, "length")  # the context rule is generate()'s: the same outputs

    def _fail(self, i: int, req: Request, e: Exception) -> None:
        """End `req` (in slot i, or not yet seated) with finish_reason "error"; free the slot."""
        log.warning("request %s failed: %r", req.id, e)
        req.error = f"{type(e).__name__}: {e}"
        slot = self.slots[i]
        if slot is not None and slot.req is req:
            self._finish(i, "error")
        elif not req.done:
            self._finish_request(req, "error")

    def _finish(self, i: int, reason: str) -> None:
        slot = self.slots[i]
        self.slots[i] = None
        if slot.stream:
            try:
                tail = slot.stream.flush() if reason in ("length", "stop") else ""
                if tail and slot.req.on_event:
                    slot.req.on_event(slot.req, tail, False)
            except Exception as e:  # the answer is cut short, but it must still end
                reason, slot.req.error = "error", f"{type(e).__name__}: {e}"
            slot.req.text = slot.stream.text
        self._finish_request(slot.req, reason)

    def _finish_request(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        req.finished_at = time.perf_counter()
        req._done.set()
        if req.on_event:
            try:
                req.on_event(req, "", True)
            except Exception:  # the caller's callback: log it, and serve the others
                log.exception("the callback of request %s failed", req.id)


class BlockedLinears:
    """Linear layers for a few rows at a time on a CPU: MKL runs a small-M product on one
    core, so each weight is split into one column block per thread and multiplied with a
    single batched `bmm` (the layout `infer/cpu_decode.py` uses for one row). Elsewhere, and
    for layers that do not split evenly, the layer itself."""

    def __init__(self, model: GPT, threads: int | None = None):
        self.blocks: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        if model.device.type != "cpu":
            return
        relayout(model)
        n = threads or torch.get_num_threads()
        for m in model.modules():
            if isinstance(m, torch.nn.Linear | LoRALinear):
                w = m.weight.detach()  # LoRALinear: base plus adapters, merged once here
                if n > 1 and w.shape[0] % n == 0:
                    blocks = w.view(n, -1, w.shape[1]).transpose(1, 2)  # (n, in, out / n)
                    self.blocks[id(m)] = (blocks, m.bias)

    def __call__(self, m, x: torch.Tensor) -> torch.Tensor:
        """m(x) for x (B, 1, in) -> (B, 1, out)."""
        entry = self.blocks.get(id(m))
        if entry is None:
            return m(x)
        w, bias = entry
        B = x.shape[0]
        y = torch.bmm(x.view(1, B, -1).expand(w.shape[0], B, -1), w)  # (n, B, out / n)
        y = y.transpose(0, 1).reshape(B, 1, -1)
        return y if bias is None else y + bias


def _mlp(block, x: torch.Tensor, linear) -> torch.Tensor:
    """The block's MLP with its matmuls through `linear` (the model's MLP modules' math)."""
    mlp = block.mlp
    if isinstance(mlp, MoE):  # routed experts: their own grouped matmuls
        return mlp(x)
    if hasattr(mlp, "w13"):  # SwiGLU
        gate, up = linear(mlp.w13, x).chunk(2, dim=-1)
        return linear(mlp.w2, F.silu(gate) * up)
    return linear(mlp.w2, F.gelu(linear(mlp.w1, x), approximate="tanh"))  # GPT-2


def decode_step(
    model: GPT, tokens: torch.Tensor, pos: torch.Tensor, cache: KVCache, linear=None
) -> torch.Tensor:
    """One new token for every row: tokens (B,) at positions pos (B,) -> logits (B, V).
    Each row writes its key/value at its own position and attends to its own prefix.
    `linear(module, x)` runs the projections (default: the module itself)."""
    linear = linear or (lambda m, x: m(x))
    cfg = model.cfg
    B = tokens.shape[0]
    H, KV, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    S = int(pos.max()) + 1  # keys up to the longest row
    keys = torch.arange(S, device=tokens.device)
    mask = keys[None, :] <= pos[:, None]  # (B, S): a row sees its own prefix and itself
    if cfg.sliding_window:
        mask &= keys[None, :] > pos[:, None] - cfg.sliding_window
    mask = mask[:, None, None, :]  # (B, 1, 1, S)
    x = model.tok_emb(tokens)[:, None]  # (B, 1, dim)
    cos = sin = None
    if model.pos_emb is None:
        cos, sin = model.rope_cos[pos][:, None, None], model.rope_sin[pos][:, None, None]
    else:
        x = x + model.pos_emb(pos)[:, None]
    rows = torch.arange(B, device=tokens.device)
    for layer, block in enumerate(model.layers):
        attn = block.attn
        qkv = linear(attn.wqkv, block.attn_norm(x)).view(B, 1, H + 2 * KV, D)
        qk = qkv[:, :, : H + KV] if cos is None else apply_rope(qkv[:, :, : H + KV], cos, sin)
        cache.k[layer][rows, :, pos] = qk[:, 0, H:]
        cache.v[layer][rows, :, pos] = qkv[:, 0, H + KV :]
        q = qk[:, :, :H].transpose(1, 2)  # (B, H, 1, D)
        k, v = cache.k[layer][:, :, :S], cache.v[layer][:, :, :S]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=H != KV)
        x = x + linear(attn.wo, y.transpose(1, 2).reshape(B, 1, H * D))
        x = x + _mlp(block, block.mlp_norm(x), linear)
    return linear(model.lm_head, model.norm(x))[:, 0]
