"""`lmforge generate` as a user runs it (a subprocess): it opens LoRA adapter directories like
chat, serve and eval (one loader, `model.load`), and `--temperature 0` is plain greedy decoding,
with no hidden penalty."""

import subprocess
import sys

import pytest
import torch

from lmforge.config import LoRAConfig
from lmforge.model.checkpoint import load_model
from lmforge.model.lora import apply_lora, merge_lora, save_adapter
from lmforge.tokenizer import Tokenizer

PROMPT = "Once upon a time"


def lmforge(*args, timeout=120):
    cmd = [sys.executable, "-m", "lmforge", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def adapter(micro_pretrained, tmp_path_factory):
    """A LoRA adapter on the micro model with made-up random B (a trained one would be
    nonzero too; zero B would make the adapter a no-op and the test blind to it)."""
    model_dir = micro_pretrained[1]
    model = apply_lora(load_model(model_dir), LoRAConfig(r=4, targets=["q", "v", "o"]), seed=0)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_b" in name.lower():
                p.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    save_adapter(model, out, base_model_path=str(model_dir))
    return out, merge_lora(model).eval()


def argmax_decode(model, ids: list[int], n: int, stop: int) -> list[int]:
    """Greedy by definition: the argmax of a full forward over the whole sequence, each step."""
    new: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids + new]))[0, -1].argmax())
            if nxt == stop:
                break
            new.append(nxt)
    return new


@pytest.mark.parametrize("which", ["model", "adapter"])
def test_generate_opens_adapters_and_greedy_is_argmax(which, adapter, micro_pretrained):
    """On the micro model, "The" is a prompt where a repetition penalty of 1.1 (the old default)
    changes the greedy continuation; the adapter directory used to be refused outright."""
    model_dir = micro_pretrained[1]
    path, model = (model_dir, load_model(model_dir)) if which == "model" else adapter
    prompt = "The" if which == "model" else PROMPT
    tok = Tokenizer.load(model_dir)
    new = argmax_decode(model, [tok.bos_id] + tok.encode(prompt), 24, tok.eos_id)
    r = lmforge("generate", path, "--prompt", prompt, "--temperature", 0,
                "--max-new-tokens", 24, "--device", "cpu")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout == prompt + tok.decode(new) + "\n"


def test_generate_names_what_a_directory_lacks(tmp_path):
    """The shared loader's error, as one line: not a traceback from whichever reader ran."""
    r = lmforge("generate", tmp_path, "--prompt", PROMPT, "--device", "cpu")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"{tmp_path} is not a model directory: it has neither config.json" in r.stderr
