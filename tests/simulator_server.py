"""Run ASGI apps (the fal simulator, small stand-in servers) on real 127.0.0.1 sockets for tests.

Each server listens on a socket bound before the app is built, so the app can be told its own
public URL with no race for the port. The server runs in a daemon thread with its own event loop.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import uvicorn
from starlette.types import ASGIApp

from services.simulator.app import SimulatorSettings, create_app

TEST_API_KEY = "sim-test-key:0123456789abcdef"


@contextmanager
def serve(build: Callable[[str], ASGIApp], port: int = 0) -> Iterator[str]:
    """Serve `build(base_url)` on a loopback port (a free one unless given); yields the base
    URL, stops on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", port))
    base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    # h11, not httptools (picked by "auto" once installed): httptools lowercases header names,
    # and the COS simulator must send COS's own casing (``ETag``), which the SDK reads from a
    # plain dict.
    config = uvicorn.Config(
        build(base_url), log_level="warning", lifespan="on", timeout_graceful_shutdown=2, http="h11"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    try:
        yield base_url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextmanager
def running_simulator(port: int = 0, **overrides: object) -> Iterator[SimulatorSettings]:
    """A simulator on a free port (or `port`); yields its settings (`public_url` is where it
    listens)."""
    holder: list[SimulatorSettings] = []

    def build(base_url: str) -> ASGIApp:
        fields = {"api_key": TEST_API_KEY, "public_url": base_url, **overrides}
        settings = SimulatorSettings.model_validate(fields)
        holder.append(settings)
        return create_app(settings)

    with serve(build, port):
        yield holder[0]
