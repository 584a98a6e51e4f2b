"""The adapter's engine thread (bunny_backend.stub.engine_thread): the engine is built on the thread that steps it."""
import threading

import pytest

from bunny_backend.stub.engine_thread import start_engine_thread


def test_the_engine_is_built_and_stepped_on_its_own_thread_once_released():
    seen = {}
    stepped = threading.Event()

    def build():
        seen["build"] = threading.current_thread()
        return "engine"

    def loop():
        seen["loop"] = threading.current_thread()
        stepped.set()

    engine, thread, go = start_engine_thread(build, loop)
    assert engine == "engine"
    assert seen["build"] is thread is not threading.current_thread()
    assert not stepped.wait(0.1)          # the caller finishes its own setup first
    go.set()
    assert stepped.wait(5)
    assert seen["loop"] is thread


def test_a_failed_build_is_raised_to_the_caller_and_its_thread_ends():
    def build():
        raise FileNotFoundError("no checkpoint at /nowhere")

    with pytest.raises(FileNotFoundError, match="/nowhere"):
        start_engine_thread(build, lambda: None)
    assert not any(t.name == "bunny-engine" and t.is_alive() for t in threading.enumerate())
