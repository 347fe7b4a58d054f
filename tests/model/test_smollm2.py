"""The real SmolLM2-135M-Instruct, imported from its GGUF by `lmforge fetch`: our model and
tokenizer against transformers' own GGUF loader on the same file (the oracle), and a real
answer. Skipped, with the reason, when the model has not been fetched; `.ci/run` fetches it."""

import pytest
import torch

from lmforge.fetch import MODELS, cache_dir

pytestmark = pytest.mark.slow

TEXTS = [  # English, Chinese and code, as the issue asks
    "The quick brown fox jumps over the lazy dog. It was 1987 in New York.",
    "中国的历史悠久，长江和黄河是中华文明的摇篮。",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def ours(smollm2_dir):
    from lmforge.model.load import load

    return load(smollm2_dir, device="cpu")


@pytest.fixture(scope="module")
def theirs(smollm2_dir):
    """transformers' GGUF loader on the very file we imported (it dequantizes to float32)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    gguf_file = cache_dir() / "gguf" / MODELS["smollm2-135m-instruct"].member.split("/")[-1]
    kw = {"gguf_file": gguf_file.name}
    tok = transformers.AutoTokenizer.from_pretrained(gguf_file.parent, **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, dtype=torch.float32, **kw
    )
    return model.eval(), tok


def test_logits_equal_transformers_gguf_loader(ours, theirs):
    model, tok = ours
    hf_model, hf_tok = theirs
    for text in TEXTS:
        ids = hf_tok(text, add_special_tokens=False).input_ids
        with torch.no_grad():
            a = model(torch.tensor([ids]))[0]
            b = hf_model(torch.tensor([ids])).logits[0]
        assert (a - b).abs().max().item() <= 1e-4, text


def test_token_ids_equal_transformers_gguf_tokenizer(ours, theirs):
    from lmforge.infer.chat import chat_prompt_ids

    _, tok = ours
    _, hf_tok = theirs
    for text in [*TEXTS, "<|im_start|>user\nhi<|im_end|>"]:
        assert tok.encode_rendered(text) == hf_tok(text, add_special_tokens=False).input_ids
    hf = hf_tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
    hf = hf["input_ids"] if isinstance(hf, dict) or hasattr(hf, "keys") else hf
    assert chat_prompt_ids(tok, QUESTION) == list(hf)


def test_greedy_answer_to_a_fixed_question(ours):
    from lmforge.infer.chat import chat_prompt_ids, stop_ids
    from lmforge.infer.generate import stream_text

    model, tok = ours
    prompt = chat_prompt_ids(tok, QUESTION)
    answer = "".join(stream_text(model, tok, prompt, max_new_tokens=20, stop_ids=stop_ids(tok)))
    assert answer.strip() == "The capital of France is Paris."
