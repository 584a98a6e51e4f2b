"""The model's image limits as its Triton config states them (parameters max_images_per_request, max_image_bytes),
read once when first needed, and the request-body limit sized from them. The front checks them before it decodes or
fetches an image, with the model's own wording; the model checks them again."""
from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Awaitable, Callable

from .errors import bad_request

TEXT_ROOM_BYTES = 1 << 20            # a request's room for its text and JSON, beside its images
UNKNOWN_LIMITS_REQUEST_BYTES = 32 << 20   # the body limit while the model's config cannot be read
UNKNOWN_LIMITS_IMAGE_BYTES = 20 << 20     # the cap on one fetched image then (the model's default max_image_bytes)


@dataclass(frozen=True, slots=True)
class ImageLimits:
    max_images_per_request: int
    max_image_bytes: int

    @classmethod
    def from_config(cls, config: dict) -> "ImageLimits | None":
        """From get_model_config(as_json=True); None when the config does not state both."""
        params = config.get("config", config).get("parameters", {})
        try:
            return cls(int(params["max_images_per_request"]["string_value"]),
                       int(params["max_image_bytes"]["string_value"]))
        except (KeyError, TypeError, ValueError):
            return None

    def request_bytes(self) -> int:
        """Room for every image base64-encoded (4 characters per 3 bytes) and for the text."""
        return self.max_images_per_request * 4 * math.ceil(self.max_image_bytes / 3) + TEXT_ROOM_BYTES

    def check_count(self, count: int) -> None:
        if count > self.max_images_per_request:
            raise bad_request(f"{count} images given; this model takes at most {self.max_images_per_request} "
                              "(max_images_per_request)", param="messages")

    def check_size(self, size: int, where: str) -> None:
        if size > self.max_image_bytes:
            raise bad_request(f"{where}: image: {size} bytes, more than the {self.max_image_bytes} allowed "
                              "(max_image_bytes)", param=where)


def image_cap(limits: ImageLimits | None) -> int:
    """The most bytes one fetched image may have."""
    return limits.max_image_bytes if limits else UNKNOWN_LIMITS_IMAGE_BYTES


def request_cap(limits: ImageLimits | None, override: int | None) -> int:
    if override is not None:
        return override
    return limits.request_bytes() if limits else UNKNOWN_LIMITS_REQUEST_BYTES


class LimitsCache:
    """The limits, read through `read_config` on first use and kept once read (None: the config has none); while
    the config cannot be read, each use tries again (Triton may not be up yet) and gets None."""

    def __init__(self, read_config: Callable[[], Awaitable[dict]]):
        self._read = read_config
        self._limits: ImageLimits | None = None
        self._known = False
        self._lock = asyncio.Lock()

    async def get(self) -> ImageLimits | None:
        if self._known:
            return self._limits
        async with self._lock:
            if not self._known:
                try:
                    self._limits = ImageLimits.from_config(await self._read())
                except Exception:   # noqa: BLE001 - unreachable, not loaded, timed out: the defaults apply
                    return None
                self._known = True
            return self._limits
