"""/v1/embeddings over HTTP with the official openai client: all-MiniLM-L6-v2 served beside the
micro chat model, its vectors equal to the Embedder's, and OpenAI's errors for bad requests."""

import base64

import httpx
import numpy as np
import pytest

openai = pytest.importorskip("openai", reason="the test client is the official openai package")

TEXTS = ["The cat sat on the mat.", "猫坐在垫子上。", "Embeddings map text to vectors."]  # made up


@pytest.fixture(scope="module")
def embed_server(micro, minilm_dir, live_server):
    from lmforge.infer.embed import Embedder
    from lmforge.serve.app import create_app

    model, tok, _ = micro
    embedder = Embedder(minilm_dir)
    app = create_app((model, tok), "micro", embedding_model=embedder)
    with live_server(app) as url:
        yield url, embedder


def _client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_client_embeds_a_list_and_a_string(embed_server):
    url, embedder = embed_server
    client = _client(url)
    ref = embedder.embed(TEXTS)
    # the client asks for base64 by default and decodes it; then float explicitly
    for fmt in (openai.NOT_GIVEN, "float"):
        r = client.embeddings.create(model="all-minilm-l6-v2", input=TEXTS, encoding_format=fmt)
        got = np.array([d.embedding for d in r.data], dtype=np.float32)
        assert [d.index for d in r.data] == [0, 1, 2] and r.model == "all-minilm-l6-v2"
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
        assert r.usage.prompt_tokens == sum(len(s) for s in embedder.tokenize(TEXTS))
    one = client.embeddings.create(model="all-minilm-l6-v2", input=TEXTS[1], dimensions=384)
    np.testing.assert_allclose(one.data[0].embedding, ref[1], rtol=0, atol=1e-6)


def test_models_lists_the_embedding_model_too(embed_server):
    url, _ = embed_server
    client = _client(url)
    assert [m.id for m in client.models.list()] == ["micro", "all-minilm-l6-v2"]
    assert client.models.retrieve("all-minilm-l6-v2").id == "all-minilm-l6-v2"
    assert client.models.retrieve("micro").id == "micro"


def test_base64_and_token_ids_over_plain_http(embed_server):
    url, embedder = embed_server
    ids = embedder.tokenize(TEXTS[:2])
    r = httpx.post(f"{url}/v1/embeddings", json={"input": ids, "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    vecs = [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in r.json()["data"]]
    np.testing.assert_allclose(np.stack(vecs), embedder.embed(TEXTS[:2]), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "body, status, says",
    [
        ({"input": "x", "dimensions": 128}, 400, "dimensions 128 is not supported"),
        ({"input": []}, 400, "input must not be empty"),
        ({"input": ["ok", ""]}, 400, "empty string"),
        ({"input": [[101, 10**9]]}, 400, "outside the vocabulary"),
        ({"input": [list(range(1000, 1300))]}, 400, "300 tokens"),
        ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"input": "x", "model": "nope"}, 404, "does not exist"),
        ({"input": 5}, 400, "input"),
    ],
)
def test_bad_requests_get_openai_errors(embed_server, body, status, says):
    url, _ = embed_server
    r = httpx.post(f"{url}/v1/embeddings", json=body)
    assert r.status_code == status and says in r.json()["error"]["message"], r.text


def test_without_an_embedding_model_it_is_404(server):
    url, _ = server
    with pytest.raises(openai.NotFoundError, match="--embedding-model"):
        _client(url).embeddings.create(model="micro", input="hello")
