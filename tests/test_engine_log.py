"""The engine's Python logging reaches Triton's log (stub/engine_log.py), each record at its level."""
import logging

import pytest

from bunny_backend.stub.engine_log import LOGGERS, forward_engine_logs


@pytest.fixture(autouse=True)
def restored_loggers():
    """forward_engine_logs is for the stub's process: leave the test process's loggers as they were (caplog)."""
    saved = {n: (list(lg.handlers), lg.level, lg.propagate) for n in LOGGERS for lg in [logging.getLogger(n)]}
    yield
    for name, (handlers, level, propagate) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


class FakeTritonLogger:
    def __init__(self):
        self.lines = []

    def log_info(self, message):
        self.lines.append(("info", message))

    def log_warn(self, message):
        self.lines.append(("warn", message))

    def log_error(self, message):
        self.lines.append(("error", message))


def test_engine_records_go_to_triton_at_their_level():
    triton = FakeTritonLogger()
    forward_engine_logs(FakeTritonLogger())   # a second call replaces the first: no line twice
    forward_engine_logs(triton)
    logging.getLogger("bunny.engine").info("bunny: KV cache of %d tokens", 1024)
    logging.getLogger("bunny_backend.ops.attention_cuda").warning("a fallback")
    logging.getLogger("bunny.engine").error("it broke")
    logging.getLogger("bunny.engine").debug("not this")
    logging.getLogger("elsewhere").warning("nor this")
    assert triton.lines == [("info", "bunny: KV cache of 1024 tokens"), ("warn", "a fallback"),
                            ("error", "it broke")]
