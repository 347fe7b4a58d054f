"""The training clock (train/loop.py) on its own: the schedule set before each step, metrics,
evaluation and save cadence, ratios logged as ratios of sums, Ctrl-C saving and stopping, a
resumed run logging what an uninterrupted one does, and a failing step named.

The "stage" here is made up for the test: least squares on seeded random data, one linear
layer, so every number is cheap and deterministic."""

import copy
import os
import signal

import pytest
import torch

from lmforge.config import PretrainConfig
from lmforge.train.loop import due, fit
from lmforge.train.metrics import read_metrics
from lmforge.train.optim import lr_at


class Toy:
    """A stage: a model, its optimizer, and the three closures fit takes."""

    def __init__(self, interrupt_at: int | None = None):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(4, 1)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.lrs, self.evals, self.saves = [], [], []
        self.interrupt_at = interrupt_at

    def train_step(self, step: int) -> dict:
        if step == self.interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, handled by fit's StopFlag
        self.lrs.append(self.opt.param_groups[0]["lr"])
        g = torch.Generator().manual_seed(step)  # the data is a function of the step
        x = torch.randn(8, 4, generator=g)
        y = x.sum(1, keepdim=True)
        err = (self.model(x) - y) ** 2
        loss = err.mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        # a mean over examples: 8 errors summed over 8 examples, whatever the steps in a line
        return {"loss": loss.detach(), "sq_err": (err.sum().detach(), 8), "tokens": 32}

    def evaluate(self, step: int) -> dict:
        self.evals.append(step)
        return {"val_w0": self.model.weight[0, 0].item()}

    def save(self, step: int, loop_state: dict) -> None:
        state = {
            "model": copy.deepcopy(self.model.state_dict()),
            "opt": copy.deepcopy(self.opt.state_dict()),
        }
        self.saves.append((step, state, loop_state))

    def resume_from(self, step: int, state: dict, loop_state: dict) -> dict:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        return {"step": step, "log": loop_state}


CFG = PretrainConfig(
    max_steps=7, lr=0.1, warmup_steps=2, log_every=2, eval_every=3, save_every=4, schedule="cosine"
)


def _fit(toy: Toy, out, resumed=None, **kw):
    return fit(
        CFG, toy.opt, toy.train_step, toy.evaluate, toy.save,
        out_dir=out, desc="toy", resumed=resumed, **kw,
    )  # fmt: skip


def _rows(out):
    return [
        {k: v for k, v in r.items() if k != "tokens_per_s"}
        for r in read_metrics(out / "metrics.jsonl")
    ]


def test_cadence_schedule_and_logged_values(tmp_path):
    toy = Toy()
    done = _fit(toy, tmp_path, eval_at_start=True)
    assert done["step"] == 7 and not done["interrupted"] and done["train_seconds"] > 0
    assert toy.lrs == [lr_at(s, CFG) for s in range(7)]  # set before each step
    assert toy.evals == [0, 3, 6, 7]  # at the start, every 3, and the last
    assert [s for s, _, _ in toy.saves] == [4, 7]  # every 4, and the last
    assert len(done["peak_memory_mb"]) == 1 and done["tokens_per_s"] > 0
    rows = _rows(tmp_path)
    logged = [r for r in rows if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4, 6, 7]
    assert [r["step"] for r in rows if "val_w0" in r] == [0, 3, 6, 7]
    assert logged[0]["lr"] == lr_at(1, CFG)  # the lr of the line's last step
    # the line's values are means over its steps; (sum, count) pairs are ratios of their sums
    for r in logged:
        assert r["sq_err"] == pytest.approx(r["loss"], rel=1e-6)
    assert done["eval"] == {"val_w0": rows[-1]["val_w0"]}


def test_ctrl_c_saves_and_stops_then_resume_logs_the_uninterrupted_rows(tmp_path):
    whole = Toy()
    _fit(whole, tmp_path / "whole")
    cut = Toy(interrupt_at=4)  # Ctrl-C during step 5 (0-based 4): saved after it, at 5
    done = _fit(cut, tmp_path / "cut")
    assert done["interrupted"] and done["step"] == 5
    assert [s for s, _, _ in cut.saves] == [4, 5]
    step, state, loop_state = cut.saves[-1]
    again = Toy()
    resumed = again.resume_from(step, state, loop_state)
    done = _fit(again, tmp_path / "cut", resumed=resumed)  # the same folder: the log continues
    assert done["step"] == 7 and not done["interrupted"]
    strip = [{k: v for k, v in r.items() if k != "s_per_step"} for r in _rows(tmp_path / "cut")]
    want = [{k: v for k, v in r.items() if k != "s_per_step"} for r in _rows(tmp_path / "whole")]
    assert strip == want
    assert torch.equal(again.model.weight, whole.model.weight)


def test_resumed_at_the_last_step_evaluates_without_logging_twice(tmp_path):
    toy = Toy()
    _fit(toy, tmp_path)
    step, state, loop_state = toy.saves[-1]
    rows = _rows(tmp_path)
    again = Toy()
    done = _fit(again, tmp_path, resumed=again.resume_from(step, state, loop_state))
    assert done["step"] == 7 and again.evals == [7] and done["eval"]
    assert _rows(tmp_path) == rows


def test_a_failing_step_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_FAIL_AT", "0:3")
    toy = Toy()
    with pytest.raises(RuntimeError, match="rank 0: failing at step 3"):
        _fit(toy, tmp_path)
    assert len(toy.lrs) == 3


def test_due():
    assert [s for s in range(1, 11) if due(s, 4, 10)] == [4, 8, 10]
    assert [s for s in range(1, 11) if due(s, 0, 10)] == [10]
