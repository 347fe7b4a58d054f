"""Small file-system helpers shared by every stage: atomic directories and JSON files.

The one idea: a reader must never see half of something. Directories are built under a
temporary name beside their destination and renamed into place only once complete (and
flushed to disk: a rename that reaches the disk before the data would survive a power cut as
a complete-looking, empty checkpoint); a failure (full disk, Ctrl-C, a bug) removes the
temporary and leaves any previous version untouched. A kill can still leave a temporary
behind, so every temporary has a name `remove_temporaries` recognises.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

# `.NAME.tmp-X` (being written), `.NAME.old-PID` (an old version being replaced),
# `.NAME.trash-PID` (being deleted): never a finished output, so safe to remove at start-up
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|trash)-[A-Za-z0-9_]+$")


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
    reader never finds neither). Its files reach the disk before the rename, the rename before
    the function returns."""
    fsync_tree(tmp)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_dir(path: Path) -> None:
    """Delete a directory so that no reader ever sees it half deleted: renamed to a trash name
    first (one atomic step), then removed. A kill in between leaves only the trash name, which
    `remove_temporaries` clears."""
    trash = path.with_name(f".{path.name}.trash-{os.getpid()}")
    os.replace(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def remove_temporaries(folder: str | Path) -> list[str]:
    """Clear what a killed process left in `folder`: temporaries and trash are deleted; an old
    version whose replacement never arrived (killed between the two renames of replace_dir)
    is put back. Only names of TEMP_NAME's shape are touched. Returns what was done."""
    folder = Path(folder)
    done = []
    if not folder.is_dir():
        return done
    for p in sorted(folder.iterdir()):
        m = TEMP_NAME.match(p.name)
        if not m:
            continue
        final = folder / m["name"]
        if m["kind"] == "old" and not final.exists():
            os.replace(p, final)
            done.append(f"restored {final.name}")
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        done.append(f"removed {p.name}")
    if done:
        fsync_dir(folder)
    return done


def move_aside(path: Path, tag: str = "old") -> Path:
    """Rename `path` to `path.TAG` (or `path.TAG.1`, `.2`, ... if taken) and return the new name:
    how a rerun keeps an earlier output instead of deleting it."""
    dest = path.with_name(f"{path.name}.{tag}")
    n = 1
    while dest.exists():
        dest = path.with_name(f"{path.name}.{tag}.{n}")
        n += 1
    os.replace(path, dest)
    return dest


def fsync_tree(root: str | Path) -> None:
    """Flush every file and folder under root to disk."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                _fsync(path, os.O_RDONLY)
        fsync_dir(dirpath)


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename inside it) to disk; Windows cannot open folders."""
    if sys.platform != "win32":
        _fsync(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync(path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str | Path, obj, indent: int = 2) -> None:
    """Write JSON through a temporary file and rename, so the file is either old or new."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(json.dumps(obj, indent=indent, ensure_ascii=False, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json(path: str | Path, what: str = "file") -> dict:
    """Read a JSON object from a file, turning a missing or malformed file (or one that holds
    something other than an object) into an error that names it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{what} {path} must hold a JSON object, not a {type(obj).__name__}")
    return obj
