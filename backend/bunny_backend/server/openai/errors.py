"""Errors in OpenAI's JSON shape, and which HTTP status a Triton error message maps to."""
from __future__ import annotations

from bunny_backend.io import wire_schema

# Untagged messages come from Triton itself (the model tags all of its own, wire_schema.tag_error). Of those, the
# ones that say the model cannot be reached or run right now are 503; any other (an input Triton refuses, say) 400.
_TRITON_UNAVAILABLE = ("is not ready", "unavailable", "unknown model", "has no available versions",
                       "stub process", "failed to connect", "socket closed")


class OpenAIError(Exception):
    """An error answered as {"error": {...}} with an HTTP status."""

    TYPES = {400: "invalid_request_error", 500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind,
                          "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param)


def from_triton(message: str) -> OpenAIError:
    """A Triton error message -> the status its code says ([invalid_argument] 400, [unavailable] 503, [internal]
    500), shown without the code; an untagged message is Triton's own: 503 if it says the model is unavailable,
    else 400."""
    code, text = wire_schema.read_error(message)
    text = text or "the Triton server answered with an empty error"
    if code is not None:
        return OpenAIError(wire_schema.ERROR_CODES[code], text)
    low = text.lower()
    return OpenAIError(503 if any(needle in low for needle in _TRITON_UNAVAILABLE) else 400, text)
