"""Run the OpenAI front (uvicorn) on a thread of bunny-serve, on a socket bound before Triton starts."""
from __future__ import annotations

import socket
import threading

STOP_GRACE_S = 5   # how long open HTTP connections may take to finish when bunny-serve stops


class OpenAIFront:
    def __init__(self, address: str, port: int, triton_url: str, model_name: str):
        """Binds the port at once (OSError if taken), then serves on a daemon thread."""
        import uvicorn

        from .app import create_app

        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((address, port))
            self.sock.listen(512)
        except OSError:
            self.sock.close()
            raise
        config = uvicorn.Config(create_app(triton_url, model_name), log_level="warning", access_log=False,
                                timeout_graceful_shutdown=STOP_GRACE_S)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="openai-front", daemon=True)
        self.thread.start()

    def stop(self, timeout_s: float = STOP_GRACE_S + 5) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)
        self.sock.close()
