"""System tests of the OpenAI API's structured output, /v1/completions, n choices and logprobs with the official
`openai` SDK, against the session's real server (openai_server_helpers.py), compared with the gRPC path and the
transformers reference."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from bunny_backend.io.tokenizer import load_tokenizer
from bunny_backend.tools.reference import ReferenceBunny
from grpc_helpers import TEXTS, inputs_of, send
from model_helpers import prompt_ids
from openai_server_helpers import GREEDY, assert_idle, grpc_messages, user

pytestmark = pytest.mark.server




PET = {"type": "object", "additionalProperties": False, "required": ["name", "legs", "kind"],
       "properties": {"name": {"type": "string", "maxLength": 8}, "kind": {"enum": ["cat", "dog"]},
                      "legs": {"type": "array", "maxItems": 4, "items": {"type": "integer", "minimum": 0,
                                                                        "maximum": 9}}}}


def test_structured_output_parses_and_a_bad_schema_is_a_400(openai_server, openai_client):
    import jsonschema
    pet = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET, "strict": True}}
    kw = dict(model="bunny", messages=[user("Describe a pet as JSON.")], max_tokens=100, temperature=1)
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda seed: openai_client.chat.completions.create(seed=seed, response_format=pet, **kw),
                             range(4)))
    for out in outs:
        assert out.choices[0].finish_reason == "stop", out.choices[0].message.content
        jsonschema.validate(json.loads(out.choices[0].message.content), PET)
    choice = openai_client.chat.completions.create(extra_body={"guided_choice": ["yes", "no"]}, **kw)
    assert choice.choices[0].message.content in ("yes", "no") and choice.choices[0].finish_reason == "stop"
    bad = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "frobnicate"}}}
    with pytest.raises(openai.BadRequestError, match='JSON schema cannot be compiled: Unsupported type "frobnicate"'):
        openai_client.chat.completions.create(response_format=bad, **kw)
    again = openai_client.chat.completions.create(seed=7, response_format=pet, **kw)
    jsonschema.validate(json.loads(again.choices[0].message.content), PET)
    assert_idle(openai_server)


def test_sdk_parse_with_a_pydantic_model(openai_client):
    from typing import Literal

    from pydantic import BaseModel, Field

    class Pet(BaseModel):
        name: str = Field(max_length=8)
        kind: Literal["cat", "dog"]
        legs: list[int] = Field(max_length=4)

    out = openai_client.chat.completions.parse(model="bunny", messages=[user("Describe a pet as JSON.")],
                                               max_tokens=100, temperature=1, seed=3, response_format=Pet)
    pet = out.choices[0].message.parsed
    assert isinstance(pet, Pet) and out.choices[0].finish_reason == "stop"
    assert pet == Pet.model_validate_json(out.choices[0].message.content)


# ---- /v1/completions, n choices, logprobs ---------------------------------------------------------------------

def test_completions_equal_the_grpc_path_without_the_template(openai_server, openai_client):
    prompts = [TEXTS[1], TEXTS[4]]
    kw = dict(model="bunny", prompt=prompts, max_tokens=12, **GREEDY)
    out = openai_client.completions.create(**kw)
    assert out.object == "text_completion" and [c.index for c in out.choices] == [0, 1]
    want = []
    for text in prompts:
        responses, err = send(openai_server.url, inputs_of(text, max_tokens=12, apply_chat_template=False))
        assert err is None, err
        want.append(responses[0])
    assert [(c.text, c.model_extra["token_ids"], c.finish_reason) for c in out.choices] == \
        [(r["text"], r["ids"], r["reason"]) for r in want]
    assert out.usage.prompt_tokens == sum(r["prompt"] for r in want)
    assert out.usage.completion_tokens == sum(r["completion"] for r in want)
    chunks = list(openai_client.completions.create(stream=True, **kw))
    for i, c in enumerate(out.choices):
        assert "".join(k.choices[0].text for k in chunks if k.choices and k.choices[0].index == i) == c.text


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_n_seeded_choices_are_each_the_request_with_seed_s_plus_i(openai_server, openai_client, stream):
    kw = dict(model="bunny", messages=[user(TEXTS[3])], n=4, seed=11, temperature=0.9, max_tokens=10,
              extra_body={"return_token_ids": True, "ignore_eos": True})
    if stream:
        chunks = list(openai_client.chat.completions.create(stream=True, **kw))
        got = [[t for c in chunks if c.choices and c.choices[0].index == i
                for t in c.choices[0].model_extra.get("token_ids") or []] for i in range(4)]
    else:
        got = [c.model_extra["token_ids"] for c in openai_client.chat.completions.create(**kw).choices]
    want = [grpc_messages(openai_server.url, [{"role": "user", "content": TEXTS[3]}], seed=11 + i, temperature=0.9,
                          max_tokens=10, ignore_eos=True)[1] for i in range(4)]
    assert got == want and len({tuple(ids) for ids in got}) > 1
    assert_idle(openai_server)


def test_n_greedy_choices_are_equal_and_share_the_prompt_s_kv(openai_server, openai_client):
    """n=4 greedy: four equal answers; the prompt is computed once, the three others take it from the prefix cache
    (a prompt no earlier test sent; 16-token blocks on the CPU)."""
    text = "Count the rabbits in this long and unusual meadow of clover, " * 8
    hits = openai_server.metric("bunny_prefix_cache_hit_tokens_total")
    out = openai_client.chat.completions.create(model="bunny", messages=[user(text)], n=4, max_tokens=4, **GREEDY)
    answers = [c.model_extra["token_ids"] for c in out.choices]
    assert [c.index for c in out.choices] == [0, 1, 2, 3] and all(a == answers[0] for a in answers)
    assert_idle(openai_server)
    prompt = out.usage.prompt_tokens
    # the first choice may also hit the system prompt's blocks, cached by earlier requests
    hit = openai_server.metric("bunny_prefix_cache_hit_tokens_total") - hits
    assert prompt > 64 and hit >= 3 * ((prompt - 1) // 16 * 16)


def test_chat_logprobs_are_consistent_with_the_answer(openai_client):
    """Greedy: each token is its position's most likely one, its bytes join to the text, logprobs are <= 0."""
    out = openai_client.chat.completions.create(model="bunny", messages=[user(TEXTS[1])], max_tokens=12,
                                                logprobs=True, top_logprobs=3, **GREEDY)
    content = out.choices[0].logprobs.content
    assert len(content) == len(out.choices[0].model_extra["token_ids"]) == out.usage.completion_tokens
    # random weights may emit bytes that are not UTF-8 (the text then holds U+FFFD where they stand)
    assert bytes(b for t in content for b in t.bytes).decode("utf-8", "replace") == out.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.top_logprobs[0].bytes == t.bytes and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert [a.logprob for a in t.top_logprobs] == sorted((a.logprob for a in t.top_logprobs), reverse=True)


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.9, seed=5, presence_penalty=1.5,
                                                                frequency_penalty=0.5)], ids=["greedy", "sampled"])
def test_chat_logprobs_are_the_reference_log_softmax(openai_client, tiny_checkpoint, sampling):
    """float32 server: each token's logprob is the transformers reference's raw log-softmax at its position within
    1e-4, whatever chose the token; the alternatives are the reference's best, sorted."""
    out = openai_client.chat.completions.create(model="bunny", messages=[user(TEXTS[2])], max_tokens=8,
                                                logprobs=True, top_logprobs=4,
                                                extra_body={"return_token_ids": True, "ignore_eos": True}, **sampling)
    ids, content = out.choices[0].model_extra["token_ids"], out.choices[0].logprobs.content
    ref, tok = ReferenceBunny.from_pretrained(tiny_checkpoint), load_tokenizer(tiny_checkpoint)
    prompt = prompt_ids(tok, TEXTS[2], False)
    want = torch.log_softmax(ref.logits(prompt + ids[:-1], None).double(), dim=-1)[len(prompt) - 1:]
    assert len(content) == len(ids) == want.shape[0] == 8
    for row, token, got in zip(want, ids, content):
        assert got.logprob == pytest.approx(row[token].item(), abs=1e-4)
        best = row.topk(4)
        assert [a.logprob for a in got.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
