"""Ports ``fluxpipe up`` checks and remembers: a port whose last server just stopped is free
again at once, and the simulator comes back on the port its data folder remembers."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest

from services.common.embedded import free_port, port_is_free, remembered_port
from services.common.supervisor import Supervisor


def leave_time_wait_on(port: int) -> None:
    """A server on `port` that closes a connection first, then stops: the server's side of the
    connection stays in TIME_WAIT on `port` for a minute."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen()
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = listener.accept()
            accepted.close()
            assert client.recv(1) == b""


def test_a_port_left_in_time_wait_is_free() -> None:
    port = free_port()
    leave_time_wait_on(port)
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))  # what the old check did: TIME_WAIT looked "in use"
    assert port_is_free(port)


def test_a_port_something_listens_on_is_not_free() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert not port_is_free(listener.getsockname()[1])


def test_the_remembered_port_is_reused_unless_it_is_taken(tmp_path: Path) -> None:
    record = tmp_path / "simulator" / "port"
    first = remembered_port(record)
    assert record.read_text().strip() == str(first)
    leave_time_wait_on(first)
    assert remembered_port(record) == first
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", first))
        squatter.listen()
        second = remembered_port(record)
    assert second != first and record.read_text().strip() == str(second)
    record.write_text("not a port")
    assert port_is_free(remembered_port(record))


def test_stop_says_one_line_per_child(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    said: list[str] = []
    programs = {
        "poller": "import time; time.sleep(60)",
        "gateway": "import pathlib, signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"pathlib.Path({str(ready)!r}).touch(); time.sleep(60)",
    }
    supervisor = Supervisor(
        {}, said.append, command=lambda name, args: [sys.executable, "-c", programs[name]]
    )
    supervisor.spawn("poller")
    supervisor.spawn("gateway")
    deadline = time.monotonic() + 10
    while not ready.exists():
        assert time.monotonic() < deadline, "the gateway stand-in never started"
        time.sleep(0.01)
    supervisor.stop(timeout=1)
    assert said == ["fluxpipe: gateway killed after 1s", "fluxpipe: poller stopped"]
