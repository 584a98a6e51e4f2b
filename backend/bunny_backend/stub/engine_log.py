"""The engine's Python logging into Triton's log. The engine logs through `logging` ("bunny.*" and the package's
module loggers: the memory plan, warm-up, graphs, CPU thread changes, fallbacks); in the stub nothing prints those
records (Python's last-resort handler shows warnings only, on the stub's stderr), so each goes to Triton's log
through `pb_utils.Logger` at its level, as the adapter's own lines do."""
from __future__ import annotations

import logging

LOGGERS = ("bunny", "bunny_backend")


class TritonLogHandler(logging.Handler):
    def __init__(self, triton_logger):
        super().__init__(logging.INFO)
        self.triton = triton_logger

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            if record.levelno >= logging.ERROR:
                self.triton.log_error(message)
            elif record.levelno >= logging.WARNING:
                self.triton.log_warn(message)
            else:
                self.triton.log_info(message)
        except Exception:   # noqa: BLE001 - logging must never fail the caller
            self.handleError(record)


def forward_engine_logs(triton_logger) -> TritonLogHandler:
    """Send INFO and above of the engine's loggers to Triton's log (once per process: a second call replaces the
    first handler)."""
    handler = TritonLogHandler(triton_logger)
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if isinstance(h, TritonLogHandler)]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return handler
