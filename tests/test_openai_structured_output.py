"""The OpenAI front's structured-output fields -> the model's response_format input (no model needed)."""
from __future__ import annotations

import json

import pytest

from bunny_backend.server.openai import translate
from bunny_backend.server.openai.completions import prepare_completion
from bunny_backend.server.openai.errors import OpenAIError
from bunny_backend.server.openai.served_models import ServedModels

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def prepare(**fields):
    body = {"model": "bunny", "messages": [{"role": "user", "content": "hi"}], **fields}
    return translate.prepare(json.dumps(body).encode(), ServedModels(("bunny",)))


@pytest.mark.parametrize("fields, want", [
    ({}, None),
    (dict(response_format={"type": "text"}), None),
    (dict(response_format={"type": "json_object"}), {"type": "json_object"}),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}}),
     {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}}),
    (dict(guided_json=SCHEMA), {"type": "json_schema", "json_schema": {"name": "guided_json", "schema": SCHEMA}}),
    (dict(guided_json=json.dumps(SCHEMA)),
     {"type": "json_schema", "json_schema": {"name": "guided_json", "schema": SCHEMA}}),
    (dict(guided_regex="[a-z]+"), {"type": "regex", "regex": "[a-z]+"}),
    (dict(guided_choice=["yes", "no"]), {"type": "choice", "choices": ["yes", "no"]}),
    (dict(response_format={"type": "text"}, guided_regex="x"), {"type": "regex", "regex": "x"}),
])
def test_fields_become_the_response_format_input(fields, want):
    inputs = prepare(**fields).inputs
    if want is None:
        assert "response_format" not in inputs
    else:
        assert inputs["response_format"].dtype == object and len(inputs["response_format"]) == 1
        assert json.loads(inputs["response_format"][0]) == want


def test_completions_take_the_same_fields():
    body = {"model": "bunny", "prompt": ["a", "b"], "guided_choice": ["yes", "no"]}
    prepared = prepare_completion(json.dumps(body).encode(), ServedModels(("bunny",)))
    assert json.loads(prepared.inputs["response_format"][0]) == {"type": "choice", "choices": ["yes", "no"]}


@pytest.mark.parametrize("fields, needle, param", [
    (dict(response_format={"type": "xml"}), 'response_format.type must be one of text, json_object, json_schema, '
                                           'got "xml"', "response_format"),
    (dict(response_format={"json_schema": {}}), "got null", "response_format"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "a"}}), '"schema": {...}',
     "response_format"),
    (dict(response_format="json"), "response_format: Input should be an object", None),
    (dict(guided_json="{not json"), "guided_json is not valid JSON", "guided_json"),
    (dict(guided_json="[1]"), "guided_json must be a JSON Schema object", "guided_json"),
    (dict(guided_choice="yes"), "guided_choice: Input should be a valid array", None),
    (dict(guided_regex="x", guided_choice=["a"]), "give at most one of", "guided_regex"),
    (dict(response_format={"type": "json_object"}, guided_json=SCHEMA), "['guided_json', 'response_format']",
     "response_format"),
])
def test_malformed_ones_are_400_naming_them(fields, needle, param):
    with pytest.raises(OpenAIError) as err:
        prepare(**fields)
    assert err.value.status == 400 and needle in err.value.message, err.value.message
    assert err.value.param == param
