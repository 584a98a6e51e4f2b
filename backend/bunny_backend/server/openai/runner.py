"""Run the OpenAI front (uvicorn) on a socket bound at once: on a thread of bunny-serve (OpenAIFront, bound before
Triton starts), or in the foreground for bunny-openai (serve_forever)."""
from __future__ import annotations

import signal
import socket
import threading

from .options import FrontOptions

STOP_GRACE_S = 5   # how long open HTTP connections may take to finish when the front stops


def bind(address: str, port: int) -> socket.socket:
    """A listening socket (OSError if the port is taken)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address, port))
        sock.listen(512)
    except OSError:
        sock.close()
        raise
    return sock


def _server(options: FrontOptions):
    import uvicorn

    from .app import create_app

    config = uvicorn.Config(create_app(options), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=STOP_GRACE_S)
    return uvicorn.Server(config)


def serve_forever(sock: socket.socket, options: FrontOptions) -> None:
    """Serve in this (main) thread until SIGTERM/SIGINT, then return."""
    server = _server(options)

    def stop(*_):   # uvicorn's own handlers take over once it runs; it then raises the signal again, under this one
        server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


class OpenAIFront:
    def __init__(self, address: str, port: int, options: FrontOptions):
        """Binds the port at once (OSError if taken), then serves on a daemon thread."""
        self.sock = bind(address, port)
        self.server = _server(options)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="openai-front", daemon=True)
        self.thread.start()

    def stop(self, timeout_s: float = STOP_GRACE_S + 5) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)
        self.sock.close()
