"""OpenAI's `response_format` and vLLM's `guided_json` / `guided_regex` / `guided_choice` -> the Triton model's
`response_format` input (docs/api/triton-model.md). Only the shape is checked here; the model compiles the grammar
and names what it cannot (a 400 either way)."""
from __future__ import annotations

import json

from .errors import bad_request
from .protocol import ChatCompletionRequest

RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")


def response_format_input(request: ChatCompletionRequest) -> str | None:
    """The JSON for the model's response_format input, or None for free text."""
    guided = {name: value for name, value in (("guided_json", request.guided_json),
                                                ("guided_regex", request.guided_regex),
                                                ("guided_choice", request.guided_choice)) if value is not None}
    formatted = request.response_format is not None and request.response_format.get("type") != "text"
    if len(guided) + formatted > 1:
        given = sorted(guided) + (["response_format"] if formatted else [])
        raise bad_request(f"give at most one of response_format (json_object or json_schema), guided_json, "
                          f"guided_regex and guided_choice; got {given}", param=given[-1])
    if formatted or (request.response_format is not None and not guided):
        return _from_response_format(request.response_format)
    if "guided_json" in guided:
        schema = guided["guided_json"]
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise bad_request(f"guided_json is not valid JSON: {e}", param="guided_json") from None
        if not isinstance(schema, dict):
            raise bad_request("guided_json must be a JSON Schema object", param="guided_json")
        return json.dumps({"type": "json_schema", "json_schema": {"name": "guided_json", "schema": schema}})
    if "guided_regex" in guided:
        return json.dumps({"type": "regex", "regex": guided["guided_regex"]})
    if "guided_choice" in guided:
        return json.dumps({"type": "choice", "choices": guided["guided_choice"]})
    return None


def _from_response_format(spec: dict) -> str | None:
    kind = spec.get("type")
    if kind not in RESPONSE_FORMAT_TYPES:
        raise bad_request(f"response_format.type must be one of {', '.join(RESPONSE_FORMAT_TYPES)}, got "
                          f"{json.dumps(kind)}", param="response_format")
    if kind == "text":
        return None
    if kind == "json_object":
        return json.dumps({"type": kind})
    inner = spec.get("json_schema")
    if not isinstance(inner, dict) or not isinstance(inner.get("schema"), dict):
        raise bad_request('response_format of type json_schema needs "json_schema": {"name", "schema": {...}}',
                          param="response_format")
    return json.dumps({"type": kind, "json_schema": inner})
