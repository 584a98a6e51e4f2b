"""The OpenAI front in-process against the fake Triton (fake_triton_server.py) with the official `openai` SDK:
n choices (seeds, order, streams, usage, errors, cancellation), logprobs in chat's and the legacy shapes,
`/v1/completions`, and the sampling fields as they reach the model's inputs. No tritonserver needed; answers are
checked against the fake model's own rules (fake_answer, fake_logprobs), not the front's code.
"""
from __future__ import annotations

import json
import socket
import time

import numpy as np
import openai
import pytest
from fake_triton_server import FAILING_SEED, FAKE_CONTEXT, FakeServer, fake_answer, fake_logprobs
from openai_front_helpers import running_front


HI = [{"role": "user", "content": "hi there"}]
HI_PROMPT_TOKENS = 10 + 2   # the fake's template counts 10, then the words


@pytest.fixture(scope="module")
def fake():
    server = FakeServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def front(fake):
    """The front's port."""
    with running_front(fake.url) as url:
        yield int(url.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def client(front):
    sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{front}/v1", api_key="unused", max_retries=0, timeout=30)
    deadline = time.monotonic() + 10
    while True:   # the front's thread may still be starting
        try:
            sdk.models.list()
            return sdk
        except openai.APIConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture
def seen(fake):
    """The Triton inputs of the requests this test makes, in arrival order."""
    start = len(fake.servicer.seen)
    return lambda: fake.servicer.seen[start:]


def words(text: str, seed: int | None, max_tokens: int) -> str:
    return "".join(fake_answer(text, None, max_tokens, False, seed))


def seeds_of(requests) -> list[int]:
    return sorted(int(r["seed"][0]) for r in requests)


# ---- n choices -------------------------------------------------------------------------------------------------

def test_chat_n_choices_with_seeds_s_plus_i(client, seen):
    out = client.chat.completions.create(model="bunny", messages=HI, n=3, seed=5, max_tokens=3)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.message.content for c in out.choices] == [words("hi there", 5 + i, 3) for i in range(3)]
    assert seeds_of(seen()) == [5, 6, 7]
    assert all(c.finish_reason == "length" for c in out.choices)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == \
        (HI_PROMPT_TOKENS, 9, HI_PROMPT_TOKENS + 9)
    again = client.chat.completions.create(model="bunny", messages=HI, n=3, seed=5, max_tokens=3)
    assert [c.message.content for c in again.choices] == [c.message.content for c in out.choices]


def test_chat_n_without_a_seed_leaves_each_choice_its_own(client, seen):
    out = client.chat.completions.create(model="bunny", messages=HI, n=2, max_tokens=2)
    assert len(out.choices) == 2 and len(seen()) == 2 and not any("seed" in r for r in seen())


def test_chat_n_streamed_interleaves_choices_each_finished(client):
    chunks = list(client.chat.completions.create(model="bunny", messages=HI, n=3, seed=10, max_tokens=4,
                                                 stream=True, stream_options={"include_usage": True}))
    by_choice = {i: [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i] for i in range(3)}
    assert all(len(c.choices) == 1 for c in chunks[:-1])
    for i, parts in by_choice.items():
        assert parts[0].delta.role == "assistant"
        assert "".join(p.delta.content or "" for p in parts) == words("hi there", 10 + i, 4)
        assert [p.finish_reason for p in parts if p.finish_reason] == ["length"] and parts[-1].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == HI_PROMPT_TOKENS
    assert all(c.usage is None for c in chunks[:-1]) and len({c.id for c in chunks}) == 1


def test_an_error_in_one_choice_fails_the_whole_answer_and_cancels_the_rest(client, fake):
    cancelled = fake.servicer.cancelled
    fake.servicer.hanging.clear()
    # choice 0 (seed 665) hangs after its first word; choice 1 (seed 666) fails once choice 0 has answered
    with pytest.raises(openai.InternalServerError, match="seed 666 fails"):
        client.chat.completions.create(model="bunny", messages=[{"role": "user", "content": "hang"}], n=2,
                                       seed=FAILING_SEED - 1, max_tokens=5)
    fake.servicer.wait_for_cancelled(cancelled + 1)


def test_completions_for_a_model_not_served_are_a_404(client, seen):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt", prompt="hi")
    assert err.value.body["code"] == "model_not_found" and seen() == []


def test_an_error_mid_stream_is_an_event(client):
    chunks = client.chat.completions.create(model="bunny", messages=HI, seed=FAILING_SEED, max_tokens=5, stream=True)
    with pytest.raises(openai.APIError, match="seed 666 fails"):
        for _ in chunks:
            pass


def _post(port: int, path: str, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_a_client_that_goes_away_cancels_every_choice(front, fake, seen, stream):
    cancelled = fake.servicer.cancelled
    sock = _post(front, "/v1/chat/completions", {"model": "bunny", "messages": [{"role": "user", "content": "hang"}],
                                                 "n": 3, "stream": stream})
    if stream:   # every choice's first word has come
        got = b""
        while got.count(b'"content": "answer"') < 3:
            got += sock.recv(65536)
    else:   # every choice's request has reached the model
        fake.servicer.wait_for_seen(len(fake.servicer.seen) - len(seen()) + 3)
    sock.close()
    fake.servicer.wait_for_cancelled(cancelled + 3)


# ---- logprobs ----------------------------------------------------------------------------------------------------

def _expected_chat_logprobs(text: str, seed: int | None, max_tokens: int, top: int) -> list[dict]:
    out = []
    for i, piece in enumerate(fake_answer(text, None, max_tokens, False, seed)):
        logprob, raw, alternatives = fake_logprobs(i + 1, piece, max(top, 1))
        out.append({"token": piece, "logprob": logprob, "bytes": list(raw),
                    "top_logprobs": [{"token": r.decode(), "logprob": lp, "bytes": list(r)}
                                     for _, lp, r in alternatives[:top]]})
    return out


@pytest.mark.parametrize("top", [0, 3])
def test_chat_logprobs_whole_and_streamed(client, seen, top):
    kw = dict(model="bunny", messages=HI, max_tokens=3, logprobs=True, top_logprobs=top)
    whole = client.chat.completions.create(**kw)
    want = _expected_chat_logprobs("hi there", None, 3, top)
    assert [e.model_dump() for e in whole.choices[0].logprobs.content] == want
    assert whole.choices[0].logprobs.refusal is None
    chunks = list(client.chat.completions.create(stream=True, **kw))
    streamed = [e.model_dump() for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert streamed == want
    assert [int(r["logprobs"][0]) for r in seen()] == [max(top, 1)] * 2


def test_chat_without_logprobs_sends_none(client, seen):
    out = client.chat.completions.create(model="bunny", messages=HI, max_tokens=2)
    assert out.choices[0].logprobs is None and "logprobs" not in seen()[0]


def _expected_legacy(text: str, max_tokens: int, k: int, seed: int | None = None) -> dict:
    pieces = fake_answer(text, None, max_tokens, False, seed)
    tops = []
    for i, piece in enumerate(pieces):
        logprob, _, alternatives = fake_logprobs(i + 1, piece, max(k, 1))
        tops.append({**{r.decode(): lp for _, lp, r in alternatives[:k]}, piece: logprob})
    return {"tokens": pieces, "token_logprobs": [fake_logprobs(i + 1, p, 1)[0] for i, p in enumerate(pieces)],
            "top_logprobs": tops, "text_offset": [len("".join(pieces[:i])) for i in range(len(pieces))]}


@pytest.mark.parametrize("k", [0, 2])
def test_completions_logprobs_whole_and_streamed(client, seen, k):
    kw = dict(model="bunny", prompt="one two three four", max_tokens=4, logprobs=k)
    want = _expected_legacy("one two three four", 4, k)
    whole = client.completions.create(**kw)
    assert whole.choices[0].logprobs.model_dump() == want
    chunks = list(client.completions.create(stream=True, **kw))
    got = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for c in chunks:
        if c.choices and c.choices[0].logprobs:
            for key in got:
                got[key] += getattr(c.choices[0].logprobs, key)
    assert got == want
    assert [int(r["logprobs"][0]) for r in seen()] == [max(k, 1)] * 2


# ---- /v1/completions -----------------------------------------------------------------------------------------------

def test_completions_list_of_prompts_times_n(client, seen):
    prompts = ["alpha beta", "gamma delta epsilon"]
    out = client.completions.create(model="bunny", prompt=prompts, n=2, seed=40, max_tokens=3)
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == [words(p, 40 + i, 3) for p in prompts for i in range(2)]
    assert out.usage.prompt_tokens == 2 + 3   # once per prompt, no template
    assert out.usage.completion_tokens == 4 * 3
    requests = seen()
    assert sorted(r["text_input"][0].decode() for r in requests) == sorted(prompts * 2)
    assert all(not r["apply_chat_template"][0] for r in requests)
    assert all(int(r["max_tokens"][0]) == 3 for r in requests)


def test_completions_streamed(client):
    chunks = list(client.completions.create(model="bunny", prompt=["a b", "c d"], max_tokens=5, seed=1, stream=True,
                                            stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" for c in chunks)
    for i, prompt in enumerate(["a b", "c d"]):
        parts = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert "".join(p.text for p in parts) == words(prompt, 1, 5)
        assert [p.finish_reason for p in parts if p.finish_reason] == ["stop"] and parts[-1].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 4


def test_completions_without_max_tokens_ask_for_the_rest_of_the_context(client, seen):
    client.completions.create(model="bunny", prompt="x")
    assert "max_tokens" not in seen()[0] and bool(seen()[0]["rest_of_context"][0])


def test_chat_without_max_tokens_asks_for_the_rest_of_the_context(client, seen):
    out = client.chat.completions.create(model="bunny", messages=HI, extra_body={"ignore_eos": True})
    assert seen()[0]["rest_of_context"].tolist() == [True] and "max_tokens" not in seen()[0]
    assert out.usage.completion_tokens == FAKE_CONTEXT - HI_PROMPT_TOKENS
    client.chat.completions.create(model="bunny", messages=HI, max_tokens=2)
    assert "rest_of_context" not in seen()[1]


# ---- sampling fields as they reach the model ---------------------------------------------------------------------

@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_penalties_and_extras_reach_the_model_inputs(client, seen, endpoint):
    fields = dict(presence_penalty=0.5, frequency_penalty=-0.25, max_tokens=3, temperature=0.5, top_p=0.9,
                  extra_body={"min_tokens": 2, "ignore_eos": True, "top_k": -1, "repetition_penalty": 1.25})
    if endpoint == "chat":
        client.chat.completions.create(model="bunny", messages=HI, **fields)
    else:
        client.completions.create(model="bunny", prompt="hi", **fields)
    r = seen()[0]
    want = {"presence_penalty": (np.float32, 0.5), "frequency_penalty": (np.float32, -0.25),
            "min_tokens": (np.int32, 2), "ignore_eos": (np.bool_, True), "top_k": (np.int32, 0),
            "repetition_penalty": (np.float32, 1.25), "temperature": (np.float32, 0.5),
            "top_p": (np.float32, 0.9), "max_tokens": (np.int32, 3)}
    got = {name: (r[name].dtype.type, r[name].tolist()) for name in want}
    assert got == {name: (dtype, [pytest.approx(v)]) for name, (dtype, v) in want.items()}
    client.chat.completions.create(model="bunny", messages=HI, max_tokens=1, extra_body={"top_k": 7})
    assert seen()[1]["top_k"].tolist() == [7]


BAD = [
    ("chat", dict(top_logprobs=2), "top_logprobs needs logprobs set to true"),
    ("chat", dict(logprobs=True, top_logprobs=21), "top_logprobs must be in [0, 20], got 21"),
    ("chat", dict(n=0), "n must be in [1, 128], got 0"),
    ("chat", dict(n=129), "n must be in [1, 128], got 129"),
    ("chat", dict(presence_penalty=2.5), "presence_penalty must be in [-2, 2], got 2.5"),
    ("chat", dict(extra_body={"min_tokens": -1}), "min_tokens must be >= 0, got -1"),
    ("chat", dict(extra_body={"top_k": -2}), "top_k must be >= 0, got -2"),
    ("completions", dict(echo=True), "echo is not supported"),
    ("completions", dict(prompt=[1, 2, 3]), "token-id prompts are not supported"),
    ("completions", dict(prompt=[[1, 2], [3]]), "token-id prompts are not supported"),
    ("completions", dict(prompt=["a", 2]), "prompt must be a string or a list of strings"),
    ("completions", dict(prompt=[]), "prompt is required"),
    ("completions", dict(prompt={"a": 1}), "prompt must be a string or a list of strings"),
    ("completions", dict(suffix="end"), "suffix is not supported"),
    ("completions", dict(best_of=3, n=2), "best_of must equal n (2)"),
    ("completions", dict(logprobs=21), "logprobs must be in [0, 20], got 21"),
    ("completions", dict(prompt=["a"] * 65, n=2), "65 prompts x n=2 is 130 choices"),
    ("completions", dict(n=200), "n must be in [1, 128], got 200"),
    ("completions", dict(logit_bias={"1": 2}), "unsupported field(s) ['logit_bias']"),
]


@pytest.mark.parametrize("endpoint, fields, needle", BAD, ids=[f"{e}-{'-'.join(f)}" for e, f, _ in BAD])
def test_bad_requests_get_400_naming_the_problem(client, seen, endpoint, fields, needle):
    with pytest.raises(openai.BadRequestError) as err:
        if endpoint == "chat":
            client.chat.completions.create(**{"model": "bunny", "messages": HI, **fields})
        else:
            client.completions.create(**{"model": "bunny", "prompt": "hi", **fields})
    assert needle in err.value.body["message"] and seen() == []
