"""Stage bookkeeping: skip when up to date, resume when unfinished, move aside when changed."""

import json

import pytest

from lmforge.pipeline import Interrupted, run_stage


def test_skip_resume_and_move_aside(tmp_path):
    calls = []

    def fn(d):
        calls.append(d)
        (d / "out.txt").write_text("x")
        return {"n": len(calls)}

    assert run_stage("s", tmp_path, "h1", fn, log=lambda m: None) == {"n": 1}
    assert run_stage("s", tmp_path, "h1", fn, log=lambda m: None) == {"n": 1}  # skipped
    assert len(calls) == 1
    assert run_stage("s", tmp_path, "h2", fn, log=lambda m: None) == {"n": 2}  # config changed
    assert (tmp_path / "s.h1" / "out.txt").exists()  # the old output is kept, not deleted
    assert json.loads((tmp_path / "s" / "stage.json").read_text())["hash"] == "h2"
    run_stage("s", tmp_path, "h3", fn, force=False, log=lambda m: None)
    run_stage("s", tmp_path, "h3", fn, force=True, log=lambda m: None)
    assert (tmp_path / "s.h3").exists() and len(calls) == 4


def test_unfinished_stage_resumes_in_place(tmp_path):
    def interrupted(d):
        (d / "partial.txt").write_text("x")
        return {"interrupted": True}

    with pytest.raises(Interrupted):
        run_stage("s", tmp_path, "h1", interrupted, log=lambda m: None)
    assert json.loads((tmp_path / "s" / "stage.json").read_text()) == {"hash": "h1", "done": False}
    seen = []
    run_stage(
        "s", tmp_path, "h1", lambda d: seen.append((d / "partial.txt").exists()), log=lambda m: None
    )
    assert seen == [True]  # same folder, partial work still there to resume from
