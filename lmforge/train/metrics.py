"""metrics.jsonl (one JSON object per logged step) and the loss-curve plot drawn from it."""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm


class MetricsLog:
    """Append-only JSONL. On resume, lines past the resumed step are dropped so the file reads
    as one uninterrupted run."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, **row) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def has(self, step: int, prefix: str) -> bool:
        """Whether a row of `step` holds a key starting with `prefix` (`val_`): a rerun of a
        finished stage evaluates again for its summary but must not log the same row twice."""
        return self.path.exists() and any(
            r.get("step") == step and any(k.startswith(prefix) for k in r)
            for r in read_metrics(self.path)
        )


def read_metrics(path: str | Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash: the rest of the log is still useful
    return rows


def plot_losses(metrics_path: str | Path, png_path: str | Path, title: str = "loss") -> Path:
    """Training loss and every `val_<lang>_loss` series against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    if train:
        ax.plot(*zip(*train), label="train", lw=1.2)
    val_keys = sorted({k for r in rows for k in r if k.startswith("val_") and k.endswith("_loss")})
    for k in val_keys:
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot(*zip(*pts), marker="o", ms=3, label=k.removesuffix("_loss").replace("_", " "))
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)


def step_bar(desc: str, total: int, initial: int, show: bool = True) -> tqdm:
    """A training loop's progress bar in optimizer steps (shown by rank 0 only under torchrun)."""
    return tqdm(
        total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, disable=not show
    )
