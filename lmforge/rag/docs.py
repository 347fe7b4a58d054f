"""Reading the documents to index: .txt and .md files (one document each, id = the file path)
and .jsonl / .jsonl.gz files (one document per row: `text`, optional `id` and `title`).

Every document is read and checked before the index is touched, so a bad one stops the run
with its name and nothing already indexed is lost."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from lmforge.config import ConfigError
from lmforge.data.readers import DataError, iter_lines

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


@dataclass(frozen=True)
class Doc:
    doc_id: str  # the JSONL row's `id`, else the file path (with the line number for a row)
    title: str
    text: str
    source: str  # the file it came from

    @property
    def hash(self) -> str:
        """What decides whether a re-index must chunk and embed this document again."""
        h = hashlib.sha256()
        for part in (self.title, self.text):
            h.update(part.encode("utf-8") + b"\0")
        return h.hexdigest()


def find_files(paths: list[str]) -> list[Path]:
    """The document files named, folders searched recursively (sorted, so ids are stable)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _kind(f))
            files += [f for f in found if not any(part.startswith(".") for part in f.parts)]
        elif p.is_file():
            if not _kind(p):
                raise ConfigError(f"{p}: not a document (.txt, .md, .jsonl or .jsonl.gz)")
            files.append(p)
        else:
            raise ConfigError(f"{p}: no such file or folder")
    if not files:
        raise ConfigError(f"no documents (.txt, .md, .jsonl, .jsonl.gz) in {', '.join(paths)}")
    return files


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return "text" if name.endswith(TEXT_SUFFIXES) else ""


def read_docs(paths: list[str]) -> list[Doc]:
    """Every document in `paths`; an empty, unreadable or malformed one is an error naming it,
    and so is an id used twice."""
    docs: list[Doc] = []
    for f in find_files(paths):
        docs += _read_jsonl(f) if _kind(f) == "jsonl" else [_read_text(f)]
    seen: dict[str, str] = {}
    for d in docs:
        if d.doc_id in seen:
            raise ConfigError(
                f"document id {d.doc_id!r} appears twice ({seen[d.doc_id]}, {d.source})"
            )
        seen[d.doc_id] = d.source
    return docs


def _read_text(path: Path) -> Doc:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read this document ({e})") from None
    if not text.strip():
        raise ConfigError(f"{path}: the document is empty")
    title = path.stem
    first = text.lstrip().splitlines()[0]
    if path.suffix.lower() == ".md" and first.startswith("# "):
        title = first[2:].strip()  # a Markdown file's first heading names it
    return Doc(str(path), title, text, str(path))


def _read_jsonl(path: Path) -> list[Doc]:
    """Every row of a JSONL(.gz) file; data.readers names a bad byte or a cut .gz by line."""
    try:
        docs = [_row_doc(path, n, line) for n, line in iter_lines(path) if line.strip()]
    except DataError as e:
        raise ConfigError(f"{path}: cannot read this document file ({e})") from None
    if not docs:
        raise ConfigError(f"{path}: the file holds no documents (it is empty)")
    return docs


def _row_doc(path: Path, n: int, line: str) -> Doc:
    where = f"{path}:{n}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: a row must be a JSON object with a `text` field")
    text = row.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{where}: the document's `text` is missing or empty")
    doc_id = str(row["id"]) if row.get("id") not in (None, "") else where
    title = str(row.get("title") or "")
    return Doc(doc_id, title, text, str(path))
