"""`lmforge chat` driven at its prompt as a real terminal program (pexpect)."""

import json
import sys

import pytest

from lmforge.infer.chat import answer
from lmforge.model.load import load

pexpect = pytest.importorskip("pexpect")


def _spawn(model_dir, *args):
    child = pexpect.spawn(
        sys.executable,
        ["-m", "lmforge", "chat", str(model_dir), "--temperature", "0", *map(str, args)],
        encoding="utf-8",
        timeout=60,
    )
    child.expect("you> ")
    return child


def test_chat_answers_resets_and_saves(micro_pretrained, tmp_path):
    model_dir = micro_pretrained[1]
    child = _spawn(model_dir, "--max-new-tokens", 6)
    child.sendline("Hello")
    child.expect("assistant> ")
    child.expect("you> ")
    shown = child.before.strip()
    model, tok = load(model_dir)
    expected = "".join(
        answer(model, tok, [{"role": "user", "content": "Hello"}], max_new_tokens=6, temperature=0)
    )
    assert shown == expected.strip()  # the greedy answer, streamed to the terminal

    child.sendline("And then?")
    child.expect("you> ")
    child.sendline(f"/save {tmp_path / 'a.json'}")
    child.expect(r"saved 4 messages")
    saved = json.loads((tmp_path / "a.json").read_text())
    assert [m["role"] for m in saved] == ["user", "assistant", "user", "assistant"]
    assert saved[0]["content"] == "Hello" and saved[1]["content"] == expected

    child.sendline("/reset")
    child.expect("conversation cleared")
    child.sendline(f"/save {tmp_path / 'b.json'}")
    child.expect("saved 0 messages")
    child.sendline("/system Be terse.")
    child.expect("system prompt set")
    child.sendline("/bogus")
    child.expect("unknown command /bogus")
    child.sendline("Hi")
    child.expect("you> ")
    child.sendline(f"/save {tmp_path / 'c.json'}")
    child.expect("saved 3 messages")
    assert json.loads((tmp_path / "c.json").read_text())[0] == {
        "role": "system",
        "content": "Be terse.",
    }
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_a_bad_save_path_is_reported_and_the_chat_goes_on(micro_pretrained, tmp_path):
    child = _spawn(micro_pretrained[1], "--max-new-tokens", 4)
    child.sendline("Hello")
    child.expect("assistant> ")
    child.expect("you> ")
    for bad in (tmp_path, tmp_path / "no" / "such" / "dir" / "a.json"):  # a directory; no folder
        child.sendline(f"/save {bad}")
        child.expect(r"error: cannot save to .*nothing was lost")
        child.expect("you> ")
    child.sendline("Again")
    child.expect("assistant> ")
    child.expect("you> ")
    child.sendline(f"/save {tmp_path / 'good.json'}")
    child.expect("saved 4 messages")
    saved = json.loads((tmp_path / "good.json").read_text())
    assert [m["content"] for m in saved[::2]] == ["Hello", "Again"]
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_chat_drops_old_turns_when_the_context_is_full(micro_pretrained, tmp_path):
    """The micro model has a 64-token context and 24 are kept for the answer."""
    child = _spawn(
        micro_pretrained[1], "--max-new-tokens", 24, "--system", "Be kind.", "--memory", "drop"
    )
    dropped = False
    for i in range(4):
        child.sendline(f"hi {i}")
        k = child.expect([r"context full: dropped the \d+ oldest messages", "assistant> "])
        dropped = dropped or k == 0
        child.expect("you> ")
    assert dropped
    child.sendline(f"/save {tmp_path / 'h.json'}")
    child.expect("saved")
    history = json.loads((tmp_path / "h.json").read_text())
    assert history[0] == {"role": "system", "content": "Be kind."}  # never dropped
    assert history[-2]["content"] == "hi 3"
    child.sendeof()
    child.expect(pexpect.EOF)


def test_chat_sets_old_turns_aside_for_retrieval_by_default(micro_pretrained):
    """--memory retrieve is the default (docs/memory.md): the turns that fall out are kept."""
    child = _spawn(micro_pretrained[1], "--max-new-tokens", 24, "--system", "Be kind.")
    for i in range(4):
        child.sendline(f"hi {i}")
        k = child.expect([r"context full: set the \d+ oldest messages aside", "assistant> "])
        child.expect("you> ")
        if k == 0:
            break
    assert k == 0
    child.sendline("/quit")
    child.expect(pexpect.EOF)
