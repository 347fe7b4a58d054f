"""Small file-system helpers shared by every stage: atomic directories and JSON files.

The one idea: a reader must never see half of something. Directories are built under a
temporary name beside their destination and renamed into place only once complete; a failure
(full disk, Ctrl-C, a bug) removes the temporary and leaves any previous version untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(final: str | Path):
    """Yield a temporary directory that becomes `final` on success (replacing an old one)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename a finished directory into place, replacing an old one (moved aside first, so a
    reader never finds neither)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | Path, obj, indent: int = 2) -> None:
    """Write JSON through a temporary file and rename, so the file is either old or new."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(
            json.dumps(obj, indent=indent, ensure_ascii=False, default=str) + "\n", encoding="utf-8"
        )
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json(path: str | Path, what: str = "file") -> dict:
    """Read a JSON file, turning a missing or malformed file into an error that names it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from None
