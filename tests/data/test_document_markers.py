"""prepare frames documents with the boundary the model was pretrained with: <|endoftext|> where
the tokenizer has it (SmolLM2, GPT-2, Qwen2), never a chat model's end-of-turn EOS."""

import json

import numpy as np
import pytest

from lmforge.config import DataConfig
from lmforge.data import prepare
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer_train import train_tokenizer

# made up for the test: a few sentences to train a small vocabulary on
TEXTS = [f"The cat number {i} sat on the mat." for i in range(50)] + ["猫坐在垫子上。"] * 20


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    d = tmp_path_factory.mktemp("ours")
    train_tokenizer(TEXTS, vocab_size=300).save(d)
    return d


def _hf_style(ours, d, bos, eos):
    """Our tokenizer with <|endoftext|> added as a special token and tokenizer_config.json naming
    `bos` and `eos`, as an imported chat model's (SmolLM2: no BOS, EOS <|im_end|>)."""
    tok = Tokenizer.load(ours)._tok
    tok.add_special_tokens(["<|endoftext|>"])
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    cfg = {"bos_token": bos, "eos_token": eos, "pad_token": eos}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return Tokenizer.load(d)


def test_our_tokenizer_keeps_bos_and_eos(ours):
    tok = Tokenizer.load(ours)
    assert prepare.document_markers(tok) == ([tok.bos_id], [tok.eos_id])


@pytest.mark.parametrize("bos", [None, "<|endoftext|>"])  # SmolLM2-Instruct / GPT-2, SmolLM2 base
def test_endoftext_goes_before_each_document(ours, tmp_path, bos):
    tok = _hf_style(ours, tmp_path / "hf", bos, "<|im_end|>")
    eot = tok.token_id("<|endoftext|>")
    assert prepare.document_markers(tok) == ([eot], [])


def test_without_endoftext_the_eos_ends_documents(ours, tmp_path):
    tok = _hf_style(ours, tmp_path / "hf", "<|bos|>", "<|eos|>")  # a Llama-style BOS/EOS pair
    # <|endoftext|> is there but BOS is a token of its own: [BOS] text [<|endoftext|>]
    assert prepare.document_markers(tok) == ([tok.bos_id], [tok.token_id("<|endoftext|>")])


def test_prepare_writes_the_separator_not_the_chat_eos(ours, tmp_path):
    tok = _hf_style(ours, tmp_path / "hf", None, "<|im_end|>")
    (tmp_path / "docs.txt").write_text("\n\n".join(TEXTS[:30]), encoding="utf-8")
    data = DataConfig(
        sources=[{"name": "d", "path": "docs.txt", "split_on": "blank_line"}],
        val_fraction=0.1,
        num_workers=1,
    )
    m = prepare.run(data, tmp_path / "hf", str(tmp_path), tmp_path / "out")
    eot, im_end = tok.token_id("<|endoftext|>"), tok.token_id("<|im_end|>")
    assert m["doc_markers"] == {"start": [eot], "end": []}
    assert m["tokenizer"] == str((tmp_path / "hf").resolve())
    ids = np.fromfile(tmp_path / "out" / "train_000.bin", dtype=m["dtype"])
    starts = np.load(tmp_path / "out" / "train_000.idx.npy")
    assert (ids[starts] == eot).all() and (ids == eot).sum() == len(starts)
    assert im_end not in ids
