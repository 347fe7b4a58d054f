"""What every benchmark here shares: the environment line, medians, and the printed table.

The one idea: a number is only worth keeping with the machine, dtype, thread count, library
versions and commit that produced it, so every benchmark ends with one JSON line holding them.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
from pathlib import Path

import torch


def git_commit() -> str:
    """HEAD's hash, with '+dirty' when the working tree has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    import transformers

    name = torch.cuda.get_device_name() if device.type == "cuda" else cpu_name()
    return {
        "device": f"{device.type}: {name}",
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "commit": git_commit(),
        "load_avg_1min": os.getloadavg()[0],  # other processes on the machine skew everything
    }


def quiet_transformers() -> None:
    """No weight-loading progress bars or generation-flag notices between the tables."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def print_table(header: list[str], rows: list[list]) -> None:
    """Right-aligned plain-text table; floats get 3 significant digits' worth of formatting."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
        return str(v)

    cells = [header] + [[fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for i, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def print_json(bench: str, env: dict, **numbers) -> None:
    print(json.dumps({"bench": bench, **env, **numbers}))
