"""A quantized model through the real server (issue #30): `bunny-serve --quantization int8` answers the demo
questions (half with an image) with the in-process int8 engine's greedy tokens, and so with the same first tokens as
the unquantized engine, within the agreement measured in tests/test_quantization.py (every answer's first 3)."""
from __future__ import annotations

import pytest

from bunny_backend.engine.sampling_params import SamplingParams
from engine_helpers import QUESTIONS, make_engine
from grpc_helpers import inputs_of, joined, send
from server_fixture import start_server, stop_process

pytestmark = [pytest.mark.server, pytest.mark.slow]


def each_alone(engine, asked) -> list[list[int]]:
    """Greedy tokens of each request run alone, as the server runs requests sent one after another."""
    got = []
    for i, (question, images) in enumerate(asked):
        engine.add_request(str(i), question, images, SamplingParams(max_tokens=16))
        ids = []
        while engine.has_unfinished():
            ids += [t for out in engine.step() for t in out.delta_token_ids]
        got.append(ids)
    return got


def test_int8_server_answers_as_the_int8_engine_and_near_the_unquantized_one(tiny_checkpoint, test_images,
                                                                              tmp_path):
    asked = [(q, [test_images[i % 4]] if i % 2 == 0 else []) for i, q in enumerate(QUESTIONS)]
    # the server's prefill is not chunked (max_num_batched_tokens 4096), nor are these engines'
    int8 = each_alone(make_engine(tiny_checkpoint, quantization="int8", max_num_batched_tokens=4096), asked)
    plain = each_alone(make_engine(tiny_checkpoint, max_num_batched_tokens=4096), asked)
    assert int8 != plain   # on this checkpoint the runs part after a few tokens (see test_quantization.py)
    server = start_server(tiny_checkpoint, tmp_path / "server.log", extra_args=("--quantization", "int8"))
    try:
        for i, (question, images) in enumerate(asked):
            responses, error = send(server.url, inputs_of(question, images, max_tokens=16))
            assert error is None, error
            got = joined(responses)[1]
            assert got == int8[i], (i, got, int8[i])
            assert got[:3] == plain[i][:3], (i, got, plain[i])
        # the engine's own log lines reach Triton's log (stub/engine_log.py): the bytes quantization saved
        assert "int8 weights: the decoder's linears" in server.log_text()
    finally:
        assert stop_process(server.proc) == 0, server.log_text()[-3000:]
