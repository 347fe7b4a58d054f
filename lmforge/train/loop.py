"""The training clock every stage runs on: pretrain, sft, reward, dpo, ppo, grpo, distill, prune.

The one idea: the step counter is the only clock, and a stage is three closures around it. The
stage says what one optimizer step is (`train_step`), how to score the model (`evaluate`) and
how to write a checkpoint (`save`); `fit` owns everything between them: the learning-rate
schedule, the progress bar, metrics.jsonl, the evaluation and save cadence ("every N steps, and
the last"), Ctrl-C on any rank, the logging sums a resumed run needs to log what an
uninterrupted one does, and the summary (steps, interruption, train seconds, peak memory per
rank). It has no hooks: anything else a stage needs belongs in its `train_step`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from lmforge.perf import matmul_flops, peak_memory_mb
from lmforge.train import dist
from lmforge.train.metrics import MetricsLog, read_metrics, step_bar
from lmforge.train.optim import lr_at

# what train_step returns: name -> a number (a float or a 0-d tensor, averaged over the steps of a
# metrics line and over ranks) or a pair (numerator, denominator), logged as the ratio of their
# sums (a mean over tokens or examples rather than over steps). The key "tokens" is not logged:
# it counts this rank's tokens, which become tokens_per_s.
Logged = dict[str, object]


class StopFlag:
    """First Ctrl-C asks the loop to save and stop after the current step; a second one aborts."""

    def __init__(self):
        self.stop = False
        self._old = None

    def __enter__(self):
        def handler(signum, frame):
            if self.stop:
                raise KeyboardInterrupt
            self.stop = True
            tqdm.write(
                "interrupt: finishing this step, saving a checkpoint, then stopping (Ctrl-C again to abort)",
                file=sys.stderr,
            )

        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            self._old = signal.signal(signal.SIGINT, handler)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def fault_step(info: dist.DistInfo) -> int:
    """LMFORGE_FAIL_AT=RANK:STEP makes that rank raise before that step: the tests' way to check
    that one failing rank stops every rank, with the error reported and no hang."""
    spec = os.environ.get("LMFORGE_FAIL_AT", "")
    rank, _, step = spec.partition(":")
    return int(step) if spec and int(rank) == info.rank else -1


def due(step: int, every: int, last: int) -> bool:
    """'Every N steps, and the last one' (N = 0: only the last)."""
    return (every and step % every == 0) or step == last


class _Sums:
    """The logged values summed since the last metrics line, on their device (no host sync per
    step); reduced over ranks only when a line is written or a checkpoint saves them."""

    def __init__(self, saved: dict | None, device):
        self.device = device
        if not saved or "sums" not in saved:  # a fresh start, or a checkpoint from before the clock
            saved = {}
        self.values = {
            k: tuple(v) if isinstance(v, list) else v for k, v in saved.get("sums", {}).items()
        }
        self.steps = saved.get("steps", 0)
        self.t0 = time.perf_counter() - saved.get("seconds", 0.0)

    def add(self, logged: Logged) -> None:
        for k, v in logged.items():
            if isinstance(v, tuple):
                num, den = self.values.get(k, (0.0, 0.0))
                self.values[k] = (num + _detach(v[0]), den + _detach(v[1]))
            else:
                self.values[k] = self.values.get(k, 0.0) + _detach(v)
        self.steps += 1

    def reduced(self, info: dist.DistInfo) -> dict:
        """Every sum as a float, averaged over ranks in one collective (a sum over ranks is the
        average times the number of ranks; a ratio of averages is the ratio of sums)."""
        keys = sorted(self.values)
        flat = [x for k in keys for x in _as_tuple(self.values[k])]
        t = torch.tensor([float(x) for x in flat], dtype=torch.float64, device=self.device)
        if info.enabled and len(flat):
            t = dist.mean(t, info)
        out, i = {}, 0
        for k in keys:
            if isinstance(self.values[k], tuple):
                out[k], i = (float(t[i]), float(t[i + 1])), i + 2
            else:
                out[k], i = float(t[i]), i + 1
        return out

    def state(self, info: dist.DistInfo) -> dict:
        """What a checkpoint keeps: the rank-averaged sums (every rank restores them, so averaging
        again gives the same numbers), the steps they cover and the seconds since the last line."""
        sums = {k: list(v) if isinstance(v, tuple) else v for k, v in self.reduced(info).items()}
        return {"sums": sums, "steps": self.steps, "seconds": time.perf_counter() - self.t0}

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside is not training time."""
        elapsed = time.perf_counter() - self.t0
        yield
        self.t0 = time.perf_counter() - elapsed

    def restart(self) -> None:
        self.values, self.steps, self.t0 = {}, 0, time.perf_counter()


def _detach(v):
    return v.detach() if isinstance(v, torch.Tensor) else v


def _as_tuple(v) -> tuple:
    return v if isinstance(v, tuple) else (v,)


def fit(
    cfg,
    optimizer,
    train_step: Callable[[int], Logged],
    evaluate: Callable[[int], dict] | None,
    save: Callable[[int, dict], None],
    *,
    out_dir: str | Path,
    desc: str,
    resumed: dict | None = None,
    info: dist.DistInfo | None = None,
    device: torch.device | str = "cpu",
    eval_at_start: bool = False,
    flops_per_token: float | None = None,
) -> dict:
    """Run `train_step(step)` from the resumed step to cfg.max_steps, with cfg's learning-rate
    schedule (lr_at) set on `optimizer` before each step, metrics every cfg.log_every steps,
    `evaluate(step)` every cfg.eval_every (and at the last step; also at step 0 with
    eval_at_start), `save(step, loop_state)` every cfg.save_every, at the last step and after a
    Ctrl-C (loop_state goes into the checkpoint's state.json; give it back as `resumed["log"]`).

    train_step returns the step's `Logged` values. evaluate returns the row to log (its keys
    start with `val_` or name the split; {} on ranks that do not evaluate). All ranks call fit.
    Returns step, interrupted, train_seconds, eval (the last row), peak_memory_mb (per rank)
    and, on rank 0, tokens_per_s (the median of the logged lines) when steps count tokens."""
    info = info or dist.DistInfo()
    device = torch.device(device)
    out_dir = Path(out_dir)
    resumed = resumed or {}
    step = resumed.get("step", 0)
    metrics = None
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics = MetricsLog(out_dir / "metrics.jsonl", resume_step=step or None)
    peak_flops = matmul_flops(device) if flops_per_token else None

    def run_eval(at_step: int, write: bool = True) -> dict:
        row = evaluate(at_step) if evaluate else {}
        if metrics and write and row:
            metrics.write(step=at_step, **row)
        if info.is_main and row:
            tqdm.write(
                f"{desc} step {at_step}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()),
                file=sys.stderr,
            )
        dist.barrier(info)
        return row

    def log_line(at_step: int, lr: float) -> None:
        nonlocal train_time
        dt = time.perf_counter() - sums.t0
        train_time += dt
        reduced = sums.reduced(info)
        tokens = reduced.pop("tokens", None)
        row = {k: v[0] / max(v[1], 1e-12) if isinstance(v, tuple) else v / sums.steps
               for k, v in reduced.items()}  # fmt: skip
        row["lr"] = lr
        if tokens is not None:
            row["tokens_per_s"] = tokens * info.dp_size / dt  # tp ranks share their tokens
            if peak_flops:
                row["mfu"] = flops_per_token * row["tokens_per_s"] / peak_flops
        else:
            row["s_per_step"] = dt / sums.steps
        if metrics:
            metrics.write(step=at_step, **row)
        shown = [k for k in row if k not in ("lr", "grad_norm")][:3]
        bar.set_postfix({k: f"{row[k]:,.3f}" if row[k] < 1e3 else f"{row[k]:,.0f}" for k in shown})
        sums.restart()

    last_eval: dict = {}
    evaluated = interrupted = False  # the same on every rank (last_eval is only filled on rank 0)
    if eval_at_start and step == 0:
        run_eval(0)
    train_time = 0.0
    sums = _Sums(resumed.get("log"), device)
    fail_at = fault_step(info)
    bar = step_bar(desc, cfg.max_steps, step, info.is_main)
    with StopFlag() as flag:
        while step < cfg.max_steps:
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if step == fail_at:
                raise RuntimeError(f"rank {info.rank}: failing at step {step} (LMFORGE_FAIL_AT)")
            sums.add(train_step(step))
            step += 1
            bar.update(1)
            if due(step, cfg.log_every, cfg.max_steps):
                log_line(step, lr)
            if due(step, cfg.eval_every, cfg.max_steps):
                with sums.paused():  # evaluation time is not training throughput
                    last_eval, evaluated = run_eval(step), True
            stop = dist.any_rank(flag.stop, info, device) and step < cfg.max_steps
            if due(step, cfg.save_every, cfg.max_steps) or stop:
                with sums.paused():
                    save(step, sums.state(info))
            if stop:
                interrupted = True
                break
    bar.close()
    if not evaluated and not interrupted:  # resumed at the last step: evaluate what was trained
        # (for the summary: the log has that row already, unless it was lost)
        last_eval = run_eval(step, write=not (metrics and metrics.has(step, "val_")))
    summary = {
        "step": step,
        "interrupted": interrupted,
        "train_seconds": train_time,
        "eval": last_eval,
        "peak_memory_mb": dist.gather(round(peak_memory_mb(device), 1), info),
    }
    if metrics:
        rates = sorted(r["tokens_per_s"] for r in read_metrics(metrics.path) if "tokens_per_s" in r)
        if rates:
            summary["tokens_per_s"] = rates[len(rates) // 2]
    return summary
