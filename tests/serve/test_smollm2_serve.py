"""`lmforge serve` on the real, imported SmolLM2-135M-Instruct, through the official `openai`
client: its own ChatML template and stop token end the turn where the model does. Skipped, with
the reason, until `lmforge fetch smollm2-135m-instruct` has run (`.ci/run` runs it)."""

import pytest

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow


def test_serve_answers_with_the_models_own_template_and_stop(smollm2_dir, live_server):
    from lmforge.serve.app import create_app

    app = create_app(smollm2_dir, max_batch=2, max_tokens=64)
    with live_server(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        [card] = client.models.list().data
        assert card.id == smollm2_dir.name  # the served name, not the path
        reply = client.chat.completions.create(
            model=card.id,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
            max_tokens=64,
        )
        choice = reply.choices[0]
        assert choice.message.content == "The capital of France is Paris."
        assert choice.finish_reason == "stop"  # <|im_end|> ended it, well before max_tokens
        assert reply.usage.completion_tokens < 64
        streamed = client.chat.completions.create(
            model=card.id,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
            max_tokens=64,
            stream=True,
        )
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        assert text == choice.message.content
