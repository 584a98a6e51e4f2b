"""Errors in OpenAI's JSON shape, and which HTTP status a Triton error message maps to."""
from __future__ import annotations

# Triton 2.51 hands a decoupled model's errors to gRPC stream clients without their status code, so the model's
# messages are told apart by what they say (model.py and the engine word them so).
_UNAVAILABLE = ("server busy", "Stub process", "engine thread has stopped", "failed to connect",
                "is not ready", "unavailable", "Socket closed")
_INTERNAL = ("internal error", "engine error")


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
    """A Triton error message -> 503 (busy, not ready, unreachable), 500 (internal) or 400 (the model refused the
    request: it names the input and the problem)."""
    message = " ".join((message or "the Triton server answered with an empty error").split())
    low = message.lower()
    if any(needle.lower() in low for needle in _UNAVAILABLE):
        return OpenAIError(503, message)
    if any(low.startswith(needle) for needle in _INTERNAL):
        return OpenAIError(500, message)
    return OpenAIError(400, message)
