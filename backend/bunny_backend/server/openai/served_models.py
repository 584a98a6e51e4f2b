"""The model names this front answers to (vLLM's --served-model-name): a request's `model` must be one of them, or
absent (the first); answers carry the name the request used."""
from __future__ import annotations

from .errors import OpenAIError


class ServedModels:
    def __init__(self, names: tuple[str, ...]):
        if not names:
            raise ValueError("at least one served model name is needed")
        self.names = names

    @property
    def default(self) -> str:
        return self.names[0]

    def resolve(self, requested: str | None) -> str:
        """The served name a request's `model` field stands for; OpenAIError(404) in OpenAI's shape if none."""
        if requested is None:
            return self.default
        if requested not in self.names:
            raise OpenAIError(404, f"The model `{requested}` does not exist. This server serves "
                              f"{', '.join(map(repr, self.names))} (GET /v1/models).", param="model",
                              code="model_not_found")
        return requested
