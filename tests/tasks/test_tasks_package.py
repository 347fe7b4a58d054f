"""lmforge/tasks sits below eval and align (it imports neither), and an installed wheel still
carries its task files."""

import fnmatch
import subprocess
import sys
from pathlib import Path

import pytest

import lmforge.tasks

REPO = Path(__file__).resolve().parents[2]
TASKS = Path(lmforge.tasks.__file__).parent


def test_tasks_import_nothing_above_them():
    modules = sorted(p.stem for p in TASKS.glob("*.py") if p.stem != "__init__")
    assert {"base", "gsm8k", "arithmetic", "qa", "multiple_choice"} <= set(modules)
    code = (
        "import sys\n"
        + "".join(f"import lmforge.tasks.{m}\n" for m in modules)
        + "print(' '.join(sorted(m for m in sys.modules if m.startswith('lmforge.'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = {m.split(".")[1] for m in out.stdout.split()}
    # a fresh interpreter: what the tasks pull in, and nothing else, is listed
    assert loaded <= {"tasks", "config", "tokenizer", "data"}, loaded
    assert not any(m.startswith("lmforge.data.") and m != "lmforge.data.readers"
                   for m in out.stdout.split())  # fmt: skip


def test_package_data_ships_the_task_files():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["lmforge"]
    files = [p.relative_to(REPO / "lmforge").as_posix() for p in TASKS.glob("*.yaml")]
    assert len(files) >= 5  # mmlu, cmmlu, ceval, arc_challenge, hellaswag
    assert all(any(fnmatch.fnmatch(f, g) for g in globs) for f in files), (files, globs)
