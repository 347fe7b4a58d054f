"""`lmforge serve --moderation-model`: /v1/moderations in OpenAI's shape through the official
client, flagged input refused (400 content_policy_violation, or a refusal answer), a flagged
answer cut mid-stream with finish_reason content_filter, bad input answered with clear errors
while the server keeps serving, and the options' errors.

The moderator here is scripted (made up for these tests: it flags a text holding a listed
word), so the server's behaviour is tested apart from the head's quality (tests/safety)."""

import json
import subprocess
import sys

import httpx
import pytest

openai = pytest.importorskip("openai")


from lmforge.config import ConfigError  # noqa: E402
from lmforge.serve.app import create_app  # noqa: E402
from lmforge.serve.moderation import Policy, parse_where  # noqa: E402

HARMFUL = ("bomb", "炸弹")  # made-up rule: these make a text a harmful request
OFFENSIVE = ("idiot", "蠢货")  # and these offensive


class Scripted:
    """A made-up moderator with Moderator's interface; counts the texts it reads."""

    cfg = {"categories": ["harmful_request", "offensive"]}

    def __init__(self, flag_len: int | None = None):
        self.read: list[str] = []
        self.flag_len = flag_len  # also flag any text at least this long (output tests)

    def moderate(self, texts):
        self.read += texts
        out = []
        for t in texts:
            harm = any(w in t for w in HARMFUL) or bool(self.flag_len and len(t) >= self.flag_len)
            off = any(w in t for w in OFFENSIVE)
            scores = {"harmful_request": 0.97 if harm else 0.02, "offensive": 0.9 if off else 0.01}
            cats = [c for c, s in scores.items() if s >= 0.5]
            out.append({"flagged": bool(cats), "score": max(scores.values()),
                        "categories": cats, "category_scores": scores})  # fmt: skip
        return out


def _client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=30)


def _app(micro, **policy):
    model, tok, _ = micro
    kw = {k: policy.pop(k) for k in ("max_request_bytes",) if k in policy}
    return create_app((model, tok), "micro", moderation=Policy(Scripted(), **policy), **kw)


def test_v1_moderations_in_openai_shape_and_bad_input(micro, live_server):
    with live_server(_app(micro, name="mod-test", max_request_bytes=20 << 20)) as url:
        client = _client(url)
        r = client.moderations.create(input=["How do I build a bomb?", "教我做炸弹", "Hello there"])
        assert r.id.startswith("modr-") and r.model == "mod-test" and len(r.results) == 3
        assert [x.flagged for x in r.results] == [True, True, False]
        # our categories are not OpenAI's: the client keeps them as extra fields
        first = r.results[0]
        assert first.categories.model_extra == {"harmful_request": True, "offensive": False}
        assert first.category_scores.model_extra == {"harmful_request": 0.97, "offensive": 0.01}
        one = client.moderations.create(input="you idiot", model="mod-test").results[0]
        assert one.flagged and one.categories.model_extra["offensive"] is True
        parts = [{"type": "text", "text": "a bomb"}, {"type": "text", "text": "fine"}]
        assert [x.flagged for x in client.moderations.create(input=parts).results] == [True, False]

        post = lambda body: httpx.post(f"{url}/v1/moderations", json=body, timeout=60)  # noqa: E731
        cases = [
            ({"input": "  "}, 400, "input 1: empty text"),
            ({"input": []}, 400, "input must not be empty"),
            ({"input": ["x"] * 33}, 400, "at most 32 inputs"),
            ({"input": "x" * (10 << 20)}, 400, "over the limit of 100,000"),
            ({"input": [{"type": "image_url", "image_url": {"url": "data:,"}}]}, 400, "image_url"),
            ({"input": "hi", "model": "gpt-4"}, 404, "moderates with 'mod-test'"),
            ({"text": "hi"}, 400, "input"),
        ]
        for body, status, msg in cases:
            resp = post(body)
            assert resp.status_code == status and msg in resp.json()["error"]["message"], (
                body if len(json.dumps(body)) < 200 else "big",
                resp.text[:300],
            )
        assert client.moderations.create(input="still serving").results[0].flagged is False


def test_flagged_input_is_a_400_and_clean_input_is_answered(micro, live_server):
    with live_server(_app(micro)) as url:
        client = _client(url)
        bad = [{"role": "user", "content": "Tell me how to build a bomb."}]
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="micro", messages=bad, max_tokens=4)
        assert e.value.code == "content_policy_violation"
        assert "harmful_request 0.97" in e.value.message
        assert e.value.response.headers["x-lmforge-moderation"].startswith("input;")
        # an earlier user turn counts too; the system prompt is the deployment's own
        history = [{"role": "user", "content": "你这个蠢货"}, {"role": "assistant", "content": "?"},
                   {"role": "user", "content": "hello"}]  # fmt: skip
        with pytest.raises(openai.BadRequestError, match="offensive"):
            client.chat.completions.create(model="micro", messages=history, max_tokens=4)
        with pytest.raises(openai.BadRequestError, match="flagged by moderation"):
            client.completions.create(model="micro", prompt="a bomb recipe", max_tokens=4)
        ok = [{"role": "system", "content": "No bomb jokes."}, {"role": "user", "content": "Hi"}]
        r = client.chat.completions.create(model="micro", messages=ok, max_tokens=4)
        assert r.choices[0].finish_reason in ("stop", "length")


def test_refuse_action_answers_the_message_whole_and_streamed(micro, live_server):
    app = _app(micro, action="refuse", message="Sorry, not that.", categories=("harmful_request",))
    with live_server(app) as url:
        client = _client(url)
        bad = [{"role": "user", "content": "build a bomb"}]
        r = client.chat.completions.create(model="micro", messages=bad, max_tokens=4)
        assert r.choices[0].message.content == "Sorry, not that."
        assert r.choices[0].finish_reason == "content_filter" and r.usage.total_tokens == 0
        chunks = list(
            client.chat.completions.create(
                model="micro",
                messages=bad,
                max_tokens=4,
                stream=True,
                stream_options={"include_usage": True},
            )  # fmt: skip
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "Sorry, not that." and chunks[-1].usage.total_tokens == 0
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "content_filter"
        c = client.completions.create(model="micro", prompt="bomb", max_tokens=4)
        assert c.choices[0].text == "Sorry, not that."
        # only harmful_request refuses here: offensive input is answered
        rude = [{"role": "user", "content": "idiot"}]
        r = client.chat.completions.create(model="micro", messages=rude, max_tokens=4)
        assert r.choices[0].finish_reason in ("stop", "length")


# made up: an answer that turns harmful in its third piece
PIECES = ["Sure, here is a story. ", "Once upon a time ", "someone built a bomb and ", "then."]


@pytest.fixture
def scripted_answer(script_answer):
    script_answer(PIECES)


def test_a_flagged_answer_is_cut_before_its_flagged_part(micro, live_server, scripted_answer):
    with live_server(_app(micro, screen_in=False, every=10, message="[removed]")) as url:
        client = _client(url)
        args = dict(model="micro", messages=[{"role": "user", "content": "a story"}], max_tokens=4)
        whole = client.chat.completions.create(**args).choices[0]
        assert whole.message.content == "[removed]" and whole.finish_reason == "content_filter"
        chunks = list(client.chat.completions.create(**args, stream=True))
        deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
        shown = "".join(deltas)
        assert shown == PIECES[0] + PIECES[1] + "[removed]", shown
        assert "bomb" not in shown and chunks[-1].choices[0].finish_reason == "content_filter"
        text = client.completions.create(model="micro", prompt="Hi", max_tokens=4, stream=True)
        pieces = list(text)
        assert "".join(c.choices[0].text for c in pieces) == PIECES[0] + PIECES[1] + "[removed]"
        assert pieces[-1].choices[0].finish_reason == "content_filter"


def test_output_moderation_cancels_a_running_generation(micro, live_server):
    """The real engine: a made-up rule flags any answer of 12+ characters, checked every 4, so
    the micro model's long answer is cut while it runs; the slot is freed for the next one."""
    model, tok, _ = micro
    policy = Policy(Scripted(flag_len=12), screen_in=False, every=4, message="[cut]")
    app = create_app((model, tok), "micro", moderation=policy)
    with live_server(app) as url:
        client = _client(url)
        args = dict(model="micro", messages=[{"role": "user", "content": "Hi"}], max_tokens=48)
        for _ in range(2):
            chunks = list(client.chat.completions.create(**args, temperature=0, stream=True))
            shown = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert shown.endswith("[cut]") and len(shown) - len("[cut]") < 12 + 4 * 8
            assert chunks[-1].choices[0].finish_reason == "content_filter"
            assert any(len(t) >= 12 for t in policy.moderator.read)  # what tripped it
        health = httpx.get(f"{url}/health", timeout=10).json()
        assert health["status"] == "ok" and health["running"] == 0


def test_policy_and_option_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown category 'violence'; moderation knows "
                       "harmful_request, offensive"):  # fmt: skip
        Policy(Scripted(), categories=("violence",))
    with pytest.raises(ConfigError, match="give in, out or in,out"):
        parse_where("sideways")
    with pytest.raises(ConfigError, match="give one of error, refuse"):
        Policy(Scripted(), action="ignore")
    assert parse_where("out") == (False, True) and parse_where("in, out") == (True, True)
    for args, msg in (
        (["--moderation-model", str(tmp_path)], "not a moderation model"),
        (["--moderation-categories", "offensive"], "needs --moderation-model"),
    ):
        r = subprocess.run([sys.executable, "-m", "lmforge", "serve", str(tmp_path), *args],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_without_a_moderation_model_v1_moderations_is_a_404(server):
    url, _ = server
    r = httpx.post(f"{url}/v1/moderations", json={"input": "hi"}, timeout=30)
    assert r.status_code == 404 and "--moderation-model" in r.json()["error"]["message"]
