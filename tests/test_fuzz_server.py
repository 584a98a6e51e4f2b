"""Hostile input against the real server (hypothesis): every request gets a result or a clear error naming the
problem, within a bounded wait, and the server keeps answering."""
from __future__ import annotations

import collections

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from grpc_helpers import error_kind, inputs_of, send_raw
from reliability_report import record
from image_bytes import encode, png_header_only

pytestmark = [pytest.mark.server, pytest.mark.slow]
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
WAIT_S = 60   # per request: longer means the server hangs


def encoded(size, fmt="PNG") -> bytes:
    return encode(Image.new("RGB", size, (30, 60, 90)), fmt)


CRAFTED_IMAGES = [png_header_only(0, 5), png_header_only(100_000, 100_000), png_header_only(1, 64_000_000), encoded((1, 20_000)),
                  encoded((20_000, 1)), encoded((1, 1)), encoded((64, 48), "GIF"), encoded((31, 17), "BMP"),
                  encoded((40, 40), "JPEG")[:200], b"\x00", b"", b"GIF89a" + bytes(20)]


def check(server, inputs, outcomes: collections.Counter) -> None:
    responses, error = send_raw(server.url, inputs, timeout=WAIT_S)   # queue.Empty here = a hang
    kind = error_kind(error)
    outcomes[kind] += 1
    if error is None:
        assert responses[-1]["final"] and responses[-1]["reason"] in ("stop", "length"), responses[-1]
    else:
        message = str(error)
        assert kind == "invalid_input" and len(message) > 10, message
        assert responses == [], "a refused request must not have produced output first"


def still_serving(server) -> None:
    responses, error = send_raw(server.url, inputs_of("Are you still there?", max_tokens=3), timeout=WAIT_S)
    assert error is None and responses[-1]["completion"] == 3


def test_fuzz_images(bunny_server):
    outcomes = collections.Counter()

    @FUZZ
    @given(image=st.one_of(st.binary(max_size=3000), st.sampled_from(CRAFTED_IMAGES)), stream=st.booleans())
    def run(image, stream):
        check(bunny_server, inputs_of("What is this?", images=[image], stream=stream, max_tokens=4), outcomes)

    run()
    still_serving(bunny_server)
    record("fuzz images", examples=sum(outcomes.values()), by_outcome=dict(outcomes))
    assert outcomes["invalid_input"] > 0 and outcomes["ok"] > 0


def test_an_image_over_the_default_byte_limit_is_refused(bunny_server):
    outcomes = collections.Counter()
    check(bunny_server, inputs_of("What is this?", images=[b"\x89PNG" + bytes(21 << 20)], max_tokens=4), outcomes)
    assert outcomes == {"invalid_input": 1}
    still_serving(bunny_server)


def test_fuzz_text(bunny_server):
    outcomes = collections.Counter()
    any_char = st.characters(codec=None, exclude_categories=())   # lone surrogates and NUL included

    @FUZZ
    @given(text=st.one_of(st.text(any_char, max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
                          st.binary(max_size=300)),
           template=st.booleans())
    def run(text, template):
        check(bunny_server, inputs_of(text, max_tokens=3, apply_chat_template=template), outcomes)

    run()
    for text in (b"", b"\x00" * 64, "\u00e9".encode() * 600_000):   # empty, NULs, 1.2 MB
        check(bunny_server, inputs_of(text, max_tokens=3), outcomes)
    still_serving(bunny_server)
    record("fuzz text", examples=sum(outcomes.values()), by_outcome=dict(outcomes))


def test_fuzz_scalars_at_and_beyond_their_bounds(bunny_server):
    outcomes = collections.Counter()
    int32 = st.integers(-2**31, 2**31 - 1)
    floats = st.floats(width=32, allow_nan=True, allow_infinity=True)

    @FUZZ
    @given(scalars=st.fixed_dictionaries({}, optional={
        "max_tokens": st.one_of(int32, st.integers(-2, 40)), "temperature": floats, "top_p": floats,
        "top_k": int32, "repetition_penalty": floats, "seed": st.integers(0, 2**64 - 1),
        "ignore_eos": st.booleans(), "apply_chat_template": st.booleans()}), stream=st.booleans())
    def run(scalars, stream):
        scalars.setdefault("max_tokens", 8)
        check(bunny_server, inputs_of("Tell me something.", stream=stream, **scalars), outcomes)

    run()
    still_serving(bunny_server)
    record("fuzz scalars", examples=sum(outcomes.values()), by_outcome=dict(outcomes))
    assert outcomes["invalid_input"] > 0 and outcomes["ok"] > 0


def text_tensor(*shape):
    return np.full(shape, b"hi", dtype=object)


WRONG = [
    ({"text_input": np.array([1], dtype=np.int32)}, "data-type"),
    ({"text_input": text_tensor(2)}, "text_input"),
    ({"text_input": text_tensor(1, 1)}, "text_input"),
    ({"text_input": text_tensor(1), "max_tokens": np.array([4.0], dtype=np.float32)}, "data-type"),
    ({"text_input": text_tensor(1), "max_tokens": np.array([4, 4], dtype=np.int32)}, "max_tokens"),
    ({"text_input": text_tensor(1), "image": np.full((1, 2), b"x", dtype=object)}, "image"),
    ({"text_input": text_tensor(1), "stream": np.array([1], dtype=np.int32)}, "data-type"),
    ({"text_input": text_tensor(1), "stop": np.array([b""], dtype=object)}, "stop"),
    ({"text_input": text_tensor(1), "stop": np.full(33, b"x", dtype=object)}, "stop strings"),
    ({"text_input": text_tensor(1), "stop": np.array([b"x" * 1025], dtype=object)}, "stop string"),
    ({"text_input": text_tensor(1), "nonsense": np.array([1], dtype=np.int32)}, "nonsense"),
    ({"max_tokens": np.array([4], dtype=np.int32)}, "text_input"),
]


@pytest.mark.parametrize("inputs, needle", WRONG, ids=[f"wrong{i}" for i in range(len(WRONG))])
def test_wrong_tensor_types_and_shapes_are_refused(bunny_server, inputs, needle):
    responses, error = send_raw(bunny_server.url, inputs, timeout=WAIT_S)
    assert error is not None and needle in str(error), str(error)
    still_serving(bunny_server)

