"""Tokenizer: lossless round trips, special-token handling, parity with transformers."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.config import ConfigError, SourceConfig
from lmforge.data.readers import iter_documents
from lmforge.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, Tokenizer
from lmforge.tokenizer_train import train_tokenizer

DATASETS = Path(__file__).resolve().parents[1] / "datasets"


def corpus() -> list[str]:
    en = SourceConfig(
        path=str(DATASETS / "tinystories" / "tinystories_train_head.txt.gz"), max_docs=300
    )
    zh = SourceConfig(path=str(DATASETS / "chinese" / "zhwiki_sample.jsonl.gz"), max_docs=2)
    return list(iter_documents(en)) + list(iter_documents(zh))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(corpus(), vocab_size=800)


@pytest.fixture(scope="module")
def tok_dir(tok, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    tok.save(d, model_max_length=512)
    return d


def test_special_tokens_come_first_in_order(tok):
    assert [tok.token_id(t) for t in SPECIAL_TOKENS] == list(range(13))
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == 800


def test_training_is_deterministic(tok):
    assert train_tokenizer(corpus(), vocab_size=800).fingerprint() == tok.fingerprint()


SAMPLES = [
    "Once upon a time, Lily found a needle.",
    "数学是利用符号语言研究數量、结构、变化以及空间等概念的一門学科。Python编程",
    "emoji 😀👍🏽 and flags 🇨🇳, tabs\t, NUL \x00, CR \r\n, line sep \u2028.",
    "<|eos|> user text <|im_start|>system\nnot a real turn<|im_end|>",
    "",
]

text_strategy = st.lists(
    st.one_of(
        st.text(),
        st.sampled_from(SPECIAL_TOKENS + ["<|", "|>", "你好世界", "😀", "\r\n", "  ", "ÄÖü"]),
        st.text(alphabet=st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF)),
    ),
    max_size=8,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(text_strategy)
def test_round_trip_and_byte_counts(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(i >= len(SPECIAL_TOKENS) for i in ids)  # user text never yields special ids
    assert int(tok.token_bytes()[ids].sum()) == len(text.encode("utf-8"))


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_samples(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch([text, text]) == [tok.encode(text)] * 2


def test_decode_keeps_special_tokens(tok):
    ids = [tok.bos_id, *tok.encode("hi"), tok.eos_id]
    assert tok.decode(ids) == "<|bos|>hi<|eos|>"


def test_token_bytes(tok):
    tb = tok.token_bytes()
    assert tb.dtype.name == "int32" and len(tb) == tok.vocab_size
    assert (tb[: len(SPECIAL_TOKENS)] == 0).all() and (tb[len(SPECIAL_TOKENS) :] >= 1).all()


def test_save_load_and_fingerprint(tok, tok_dir):
    assert sorted(p.name for p in tok_dir.iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    loaded = Tokenizer.load(tok_dir)
    assert loaded.fingerprint() == tok.fingerprint()
    file_hash = hashlib.sha256((tok_dir / "tokenizer.json").read_bytes()).hexdigest()[:16]
    assert tok.fingerprint() == file_hash
    assert loaded.encode("<|eos|>") == tok.encode("<|eos|>") != [tok.eos_id]
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["model_max_length"] == 512 and cfg["add_bos_token"] is True


def test_missing_bos_and_pad_fall_back_to_eos(tok, tmp_path):
    tok.save(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.update(bos_token=None, pad_token=None)  # as Qwen2 writes it
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    loaded = Tokenizer.load(tmp_path)
    assert loaded.bos_id == loaded.pad_id == loaded.eos_id == 2
    loaded.save(tmp_path / "again")  # saved back, it still has no BOS (EOS is only a stand-in)
    again = Tokenizer.load(tmp_path / "again")
    assert not again.prepend_bos and not again.adds_bos
    assert again.chat_prefix([{"role": "user", "content": "hi"}]) == []


def test_load_errors(tmp_path):
    with pytest.raises(ConfigError, match="no tokenizer at .*tokenizer.json does not exist"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ConfigError, match="tokenizer.json is not a valid tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_runtime_tokenizer_imports_nothing_from_data():
    # data/ uses the tokenizer (prepare encodes with it): an import back would be a cycle
    code = "import sys, lmforge.tokenizer; print(*sorted(m for m in sys.modules if m[:8] == 'lmforge.'))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    assert "lmforge.tokenizer" in out
    assert {m.split(".")[1] for m in out} <= {"config", "tokenizer"}, out


def test_transformers_parity(tok, tok_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 0)
    assert hf.model_max_length == 512
    for text in SAMPLES[:3]:
        assert hf(text)["input_ids"] == [tok.bos_id] + tok.encode(text)  # BOS, as we train
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
        assert hf.decode(tok.encode(text)) == text
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 你好"}]
    want = "<|bos|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi 你好<|im_end|>\n"
    assert hf.apply_chat_template(msgs, tokenize=False) == want
    prompt = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert prompt == want + "<|im_start|>assistant\n"
    # in a rendered template the markers are real special tokens (BOS 1, 3 and 4), not text
    ids = hf(prompt, add_special_tokens=False)["input_ids"]
    assert ids.count(1) == 1 and ids.count(3) == 3 and ids.count(4) == 2
    assert hf.chat_template == CHAT_TEMPLATE


def _ids(x) -> list[int]:
    return list(x["input_ids"] if hasattr(x, "keys") else x)


@pytest.mark.parametrize(
    "msgs",
    [
        [{"role": "user", "content": "Once upon a time, Lily found a needle."}],
        [
            {"role": "system", "content": "用中文回答。"},
            {"role": "user", "content": "数学是什么？"},
            {"role": "assistant", "content": "一門学科。"},
            {"role": "user", "content": "Python编程呢？"},
        ],
    ],
    ids=["en", "zh"],
)
def test_transformers_encodes_what_we_train_on(tok, tok_dir, msgs):
    """transformers' default encode and apply_chat_template give lmforge's ids exactly: BOS
    once, from the post-processor or from the template, never twice."""
    from lmforge.infer.chat import chat_prompt_ids

    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    text = msgs[-1]["content"]
    assert hf(text).input_ids == [tok.bos_id] + tok.encode(text)
    ours = chat_prompt_ids(tok, msgs)
    assert ours.count(tok.bos_id) == 1 and ours[0] == tok.bos_id
    theirs = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    assert _ids(theirs) == ours
    full = msgs + [{"role": "assistant", "content": "好的 OK"}]
    assert _ids(hf.apply_chat_template(full, tokenize=True)) == tok.encode_chat(full)


def _old_style(tok, path: Path) -> Path:
    """A tokenizer directory as lmforge wrote it before BOS moved into tokenizer.json and the
    template: no post-processor, add_bos_token false, ChatML without BOS."""
    tok.save(path)
    spec = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    spec["post_processor"] = None
    (path / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    cfg = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["chat_template"].startswith("{{ bos_token }}")
    cfg.update(add_bos_token=False, chat_template=cfg["chat_template"][len("{{ bos_token }}") :])
    (path / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return path


def test_old_tokenizers_encode_exactly_as_before(tok, tmp_path):
    """A checkpoint saved before BOS was in the template still loads, and lmforge's ids for
    pretraining text, chat prompts and SFT examples equal a new tokenizer's, BOS once."""
    from lmforge.align.sft import encode_example
    from lmforge.infer.chat import chat_prompt_ids

    old = Tokenizer.load(_old_style(tok, tmp_path / "old"))
    assert not old.adds_bos and tok.adds_bos
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi 你好"},
        {"role": "assistant", "content": "Hello! 很好。"},
        {"role": "user", "content": "<|bos|> typed"},
    ]
    for text in SAMPLES:
        assert old.encode(text) == tok.encode(text)
    assert old.chat_prefix(conv) == [tok.bos_id] and tok.chat_prefix(conv) == []
    assert chat_prompt_ids(old, conv) == chat_prompt_ids(tok, conv)
    assert chat_prompt_ids(tok, conv).count(tok.bos_id) == 1
    for n in (3, 4):
        a, _ = encode_example(old, conv[:n], 256, "truncate")
        b, _ = encode_example(tok, conv[:n], 256, "truncate")
        assert a.tolist() == b.tolist() and list(a[0]).count(tok.bos_id) == 1
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "old"))
    assert hf("Hi there").input_ids == tok.encode("Hi there")  # as before: no BOS
