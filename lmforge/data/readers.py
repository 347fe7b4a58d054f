"""Read raw documents from txt, jsonl and parquet files (each optionally gzipped), streaming.

The one idea: everything downstream (tokenizer training, sharding) sees a source as a plain
iterator of document strings, read in constant memory, and every bad byte in the input turns into
a `DataError` that names the file and the line (or byte offset, or row) where it is. The train/val
split is a hash of each document's text, so it is the same in every process and on every machine,
and a document that occurs twice can never leak from train into val.
"""

from __future__ import annotations

import glob as globlib
import gzip
import hashlib
import itertools
import json
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from lmforge.config import ConfigError, DataConfig, SourceConfig, resolve_path

FORMATS = ("txt", "jsonl", "parquet")


class DataError(ValueError):
    """An input file that cannot be read as documents; the message names the file and where."""


# --------------------------------------------------------------------------- finding files


def file_format(path: Path | str, fmt: str = "auto") -> str | None:
    """`fmt` if set, else the format from the extension (`.jsonl.gz` -> jsonl); None if unknown."""
    if fmt != "auto":
        return fmt
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    suffix = name.rsplit(".", 1)[-1] if "." in name else ""
    return suffix if suffix in FORMATS else None


def _supported(paths: Iterable[Path], fmt: str = "auto") -> list[Path]:
    # a folder or glob usually also holds README/PROVENANCE files: only data extensions count
    return sorted(p for p in paths if p.is_file() and file_format(p, fmt) is not None)


def source_files(src: SourceConfig, base_dir: str = ".") -> list[Path]:
    """The files a source reads: one file, every supported file under a folder, or a glob's matches.

    Files in a folder are kept only if their extension is .txt/.jsonl/.parquet (+ .gz); so are a
    glob's matches unless `format` is set, which reads every file the glob names in that format.
    Sorted, so that the document order never depends on the file system."""
    p = resolve_path(src.path, base_dir)
    where = f"data source {src.name!r}"
    if any(ch in src.path for ch in "*?["):
        matches = [Path(m) for m in sorted(globlib.glob(str(p), recursive=True))]
        # files the glob names directly are read as `format` says; folders by their extensions
        direct = _supported((m for m in matches if m.is_file()), src.format)
        inside = _supported(f for m in matches if m.is_dir() for f in m.rglob("*"))
        files = sorted(set(direct + inside))
        if not files:
            raise ConfigError(
                f"{where}: no .txt/.jsonl/.parquet files (optionally .gz) match {src.path!r} "
                f"(tried {_tried(src.path, base_dir)}; {len(matches)} paths matched in all)"
            )
        return files
    if p.is_dir():
        files = _supported(p.rglob("*"))
        if not files:
            raise ConfigError(
                f"{where}: folder {p} holds no .txt/.jsonl/.parquet files (optionally .gz)"
            )
        return files
    if p.is_file():
        if file_format(p, src.format) is None:
            raise ConfigError(
                f"{where}: cannot tell the format of {p} from its extension; "
                f"set format: txt | jsonl | parquet"
            )
        return [p]
    raise ConfigError(f"{where}: file not found: {src.path!r} (tried {_tried(src.path, base_dir)})")


def _tried(path: str, base_dir: str) -> str:
    # the same candidates as config.resolve_path, so the message lists exactly what was looked at
    p = Path(path).expanduser()
    if p.is_absolute():
        return str(p)
    base = Path(base_dir)
    cands = dict.fromkeys(str(c) for c in (p, base / p, base.parent / p))
    return ", ".join(cands)


# --------------------------------------------------------------------------- raw lines


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


OnError = Callable[[DataError], None] | None


def _problem(on_error: OnError, message: str) -> None:
    """Raise the problem, or hand it to `on_error`, which records it so that reading goes on."""
    if on_error is None:
        raise DataError(message)
    on_error(DataError(message))


def iter_lines(path: Path, on_error: OnError = None) -> Iterator[tuple[int, str]]:
    """(line number from 1, text with its '\\n') of a text file, gzipped or not.

    Decodes line by line so that invalid UTF-8 (or a NUL byte: a binary file) is reported with its
    line and byte offset, and a corrupt or truncated .gz with the file name, instead of a codec
    traceback. With `on_error`, a bad line is reported to it and skipped, and a corrupt .gz ends
    the file."""
    offset = 0
    lineno = 0
    try:
        with _open(path) as f:
            for lineno, raw in enumerate(f, 1):
                bad = raw.find(b"\0")
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    offset += len(raw)
                    _problem(
                        on_error,
                        f"{path}: invalid UTF-8 at line {lineno}, byte offset "
                        f"{offset - len(raw) + e.start} (byte 0x{raw[e.start]:02x}); "
                        f"re-encode the file as UTF-8",
                    )
                    continue
                if bad >= 0:
                    offset += len(raw)
                    _problem(
                        on_error,
                        f"{path}: NUL byte at line {lineno}, byte offset {offset - len(raw) + bad} "
                        f"(a binary file?)",
                    )
                    continue
                if lineno == 1 and line.startswith("\ufeff"):
                    line = line[1:]  # a UTF-8 byte order mark is not text
                if line.endswith("\r\n"):
                    line = line[:-2] + "\n"  # Windows line ends: documents get plain \n
                offset += len(raw)
                yield lineno, line
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        _problem(on_error, f"{path}: corrupt or truncated gzip file (after {lineno} lines): {e}")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None


# --------------------------------------------------------------------------- documents per format


def pack_pieces(pieces: Iterable[str], min_chars: int, sep: str) -> Iterator[str]:
    """Join consecutive pieces with `sep` until each document has at least `min_chars` characters.

    Pieces are stripped and empty ones dropped; a short remainder at the end is still yielded."""
    buf: list[str] = []
    n = 0
    for piece in pieces:
        piece = piece.strip()
        if not piece:
            continue
        buf.append(piece)
        n += len(piece) + (len(sep) if len(buf) > 1 else 0)
        if n >= min_chars:
            yield sep.join(buf)
            buf, n = [], 0
    if buf:
        yield sep.join(buf)


def _paragraphs(path: Path, on_error: OnError = None) -> Iterator[str]:
    para: list[str] = []
    for _, line in iter_lines(path, on_error):
        if line.strip():
            para.append(line)
        elif para:
            yield "".join(para)
            para = []
    if para:
        yield "".join(para)


def _whole_files(paths: list[Path], on_error: OnError = None) -> Iterator[str]:
    for path in paths:
        yield "".join(line for _, line in iter_lines(path, on_error))


def _txt_documents(paths: list[Path], src: SourceConfig, on_error: OnError = None) -> Iterator[str]:
    if src.split_on == "file":
        # the pieces are whole files, so min_chars may join several small files into one document
        yield from pack_pieces(_whole_files(paths, on_error), src.min_chars, "\n\n")
        return
    for path in paths:  # a document never spans two files
        if src.split_on == "line":
            lines = (line for _, line in iter_lines(path, on_error))
            yield from pack_pieces(lines, src.min_chars, "\n")
        else:
            yield from pack_pieces(_paragraphs(path, on_error), src.min_chars, "\n\n")


def _jsonl_row(path: Path, lineno: int, line: str, field: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: line {lineno} is not valid JSON: {e.msg} (column {e.colno})"
        ) from None
    if not isinstance(row, dict):
        raise DataError(f"{path}: line {lineno} is a JSON {type(row).__name__}, expected an object")
    if field not in row:
        keys = ", ".join(list(row)[:10])
        raise DataError(
            f"{path}: line {lineno} has no field {field!r} (it has: {keys}); set text_field"
        )
    text = row[field]
    if not isinstance(text, str):
        raise DataError(
            f"{path}: line {lineno}: field {field!r} is {type(text).__name__}, expected a string"
        )
    return text


def _jsonl_documents(path: Path, field: str, on_error: OnError = None) -> Iterator[str]:
    for lineno, line in iter_lines(path, on_error):
        if not line.strip():
            continue
        try:
            yield _jsonl_row(path, lineno, line, field)
        except DataError as e:
            if on_error is None:
                raise
            on_error(e)


def _parquet_documents(path: Path, field: str, on_error: OnError = None) -> Iterator[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{path}: reading parquet needs pyarrow: pip install lmforge[data]"
        ) from None
    opened = _open(path)  # a gzip file object is seekable, which is all parquet needs (slowly)
    try:
        try:
            pf = pq.ParquetFile(opened)
        except (pa.ArrowException, OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: not a readable parquet file: {e}") from None
        schema = pf.schema_arrow
        if field not in schema.names:
            raise DataError(
                f"{path}: no column {field!r} (columns: {', '.join(schema.names)}); set text_field"
            )
        tp = schema.field(field).type
        if not (pa.types.is_string(tp) or pa.types.is_large_string(tp)):
            raise DataError(f"{path}: column {field!r} has type {tp}, expected a string column")
        row = 0
        # record batches keep memory constant however large the file
        for batch in pf.iter_batches(batch_size=1024, columns=[field]):
            for text in batch.column(0).to_pylist():
                row += 1
                if text is None:
                    _problem(
                        on_error,
                        f"{path}: row {row - 1}: field {field!r} is null, expected a string",
                    )
                    continue
                yield text
    finally:
        opened.close()


def source_units(files: list[Path], src: SourceConfig) -> list[list[Path]]:
    """The files of a source in groups that are read as one stream of documents: every file on its
    own, except runs of txt files when split_on=file (min_chars may join small files together)."""
    units: list[list[Path]] = []
    for fmt, group in itertools.groupby(files, key=lambda p: file_format(p, src.format)):
        group = list(group)
        if fmt == "txt" and src.split_on == "file":
            units.append(group)
        else:
            units.extend([p] for p in group)
    return units


def unit_documents(unit: list[Path], src: SourceConfig, on_error: OnError = None) -> Iterator[str]:
    """The raw documents of one unit of `source_units` (not yet stripped or counted)."""
    fmt = file_format(unit[0], src.format)
    if fmt == "txt":
        yield from _txt_documents(unit, src, on_error)
        return
    read = _jsonl_documents if fmt == "jsonl" else _parquet_documents
    for path in unit:
        yield from read(path, src.text_field, on_error)


def _raw_documents(files: list[Path], src: SourceConfig) -> Iterator[str]:
    for unit in source_units(files, src):
        yield from unit_documents(unit, src)


def iter_documents(src: SourceConfig, base_dir: str = ".") -> Iterator[str]:
    """Every document of one source, in file order, stripped and non-empty, at most src.max_docs."""
    n = 0
    for doc in _raw_documents(source_files(src, base_dir), src):
        doc = doc.strip()
        if not doc:
            continue
        yield doc
        n += 1
        if src.max_docs and n >= src.max_docs:
            return


# --------------------------------------------------------------------------- train / val split


def read_jsonl(
    path, parse, skip_bad_rows: bool = False, max_rows: int = 0, what: str = "row", skippable=True
):
    """(items, problems): parse(row) for each JSON line of path (gzipped or not; blank lines
    skipped), at most max_rows items (0 = all). A line that is not JSON or that parse rejects
    with ValueError is a DataError naming file and line, unless skip_bad_rows, which lists it
    in problems and goes on (skippable=False: the caller has no such option to suggest)."""
    items, problems = [], []
    for lineno, line in iter_lines(path):
        if max_rows and len(items) >= max_rows:
            break
        if not line.strip():
            continue
        try:
            items.append(parse(json.loads(line)))
            continue
        except json.JSONDecodeError as e:
            problem = f"{path}:{lineno}: invalid JSON at column {e.colno}: {e.msg}"
        except ValueError as e:
            problem = f"{path}:{lineno}: {e}"
        if not skip_bad_rows:
            hint = f" (pass --skip_bad_rows true to skip such {what}s)" if skippable else ""
            raise DataError(problem + hint)
        problems.append(problem)
    return items, problems


def is_val(text: str, val_fraction: float) -> bool:
    """Is this document held out? A hash of its UTF-8 text, so the answer never depends on the
    process, the machine, PYTHONHASHSEED or the order documents are read in."""
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "big") < val_fraction * 2**64


def iter_split(
    cfg: DataConfig, base_dir: str = ".", split: str = "train"
) -> Iterator[tuple[SourceConfig, str]]:
    """(source, document) for every document of every source that falls in `split` (train | val)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    want_val = split == "val"
    for src in cfg.sources:
        for doc in iter_documents(src, base_dir):
            if is_val(doc, cfg.val_fraction) == want_val:
                yield src, doc
