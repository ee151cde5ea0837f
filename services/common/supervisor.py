"""The child processes of ``fluxpipe up``: start them, restart one that dies, stop them all.

A service that exits on its own is restarted after a short backoff (1 s, then 2, 4, 8 s)
and the stack keeps serving; its unfinished messages come back to the new process through
redelivery, so nothing is lost. A service that dies ``max_restarts`` times within
``window`` seconds is crash-looping: ``check`` raises and ``fluxpipe up`` stops everything,
saying which service and how it exited.

Children run in their own sessions (a Ctrl-C reaches ``up`` alone, which stops them in
order) and are sent SIGTERM by the kernel if ``up`` itself dies (Linux), so they never
outlive it holding ports. A child may run at a lower CPU priority (``nice``): ``fluxpipe up``
runs the workers below the gateway, so on a saturated machine users' requests are answered
first and the backlog waits in the stream (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from services.common.embedded import die_with_parent


def _prepare_child(nice: int) -> None:
    """In the child before exec: its priority, and its death with ``up`` (Linux)."""
    if nice:
        os.nice(nice)
    if sys.platform == "linux":
        die_with_parent()


@dataclass
class Child:
    name: str
    args: tuple[str, ...]
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    deaths: deque[float] = field(default_factory=deque)
    restart_at: float | None = None
    nice: int = 0


def fluxpipe_run(name: str, args: tuple[str, ...]) -> list[str]:
    return [sys.executable, "-m", "services.cli", "run", name, *args]


@dataclass
class Supervisor:
    env: dict[str, str]
    say: Callable[[str], None]
    max_restarts: int = 5
    window: float = 60.0
    command: Callable[[str, tuple[str, ...]], list[str]] = fluxpipe_run
    children: list[Child] = field(default_factory=list)

    def spawn(
        self, name: str, *args: str, env: dict[str, str] | None = None, nice: int = 0
    ) -> subprocess.Popen[bytes]:
        """Start ``command(name, args)`` (``fluxpipe run <name> <args…>``) in its own session;
        ``env`` adds to the shared environment for this child alone (e.g. its NATS user), and
        ``nice`` lowers its CPU priority by that much."""
        child = Child(name, args, env=env or {}, nice=nice)
        self.children.append(child)
        return self._start(child)

    def _start(self, child: Child) -> subprocess.Popen[bytes]:
        child.proc = subprocess.Popen(
            self.command(child.name, child.args),
            env={**self.env, **child.env},
            start_new_session=True,
            preexec_fn=partial(_prepare_child, child.nice),
        )
        child.restart_at = None
        return child.proc

    def exited(self) -> list[tuple[str, int]]:
        """Children that are not running: (name, exit code)."""
        return [
            (c.name, c.proc.returncode)
            for c in self.children
            if c.proc is not None and c.proc.poll() is not None
        ]

    def check(self, now: float | None = None) -> None:
        """Restart children that died (after their backoff); raise if one is crash-looping."""
        now = time.monotonic() if now is None else now
        for child in self.children:
            if child.proc is None or child.proc.poll() is None:
                continue
            if child.restart_at is None:
                code = child.proc.returncode
                while child.deaths and child.deaths[0] < now - self.window:
                    child.deaths.popleft()
                child.deaths.append(now)
                if len(child.deaths) >= self.max_restarts:
                    raise RuntimeError(
                        f"{child.name} exited with code {code} {len(child.deaths)} times "
                        f"within {self.window:.0f}s; giving up"
                    )
                delay = min(2.0 ** (len(child.deaths) - 1), 30.0)
                child.restart_at = now + delay
                self.say(f"fluxpipe: {child.name} exited with code {code}; restarting it in {delay:.0f}s")
            elif now >= child.restart_at:
                self._start(child)
                self.say(f"fluxpipe: {child.name} restarted")

    def stop(self, timeout: float = 45.0) -> None:
        """SIGTERM to every child at once (each finishes its own work in its grace), then
        SIGKILL to any still running after ``timeout``; one line said per child stopped (its
        exit code too, unless 0 or death by the SIGTERM itself, as uvicorn re-raises it)."""
        live = [c for c in reversed(self.children) if c.proc is not None and c.proc.poll() is None]
        for child in live:
            assert child.proc is not None
            child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in live:
            assert child.proc is not None
            try:
                code = child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
                self.say(f"fluxpipe: {child.name} killed after {timeout:.0f}s")
                continue
            clean = code in (0, -signal.SIGTERM)
            self.say(f"fluxpipe: {child.name} stopped" + ("" if clean else f" (exit code {code})"))


@dataclass
class KeptServer:
    """An embedded server (NATS, PostgreSQL) that ``fluxpipe up`` keeps alive: when it dies it
    is started again by ``start`` (on the same data folder and port, so every client reconnects
    to the same address and finds its data), up to ``max_restarts`` times within ``window``
    seconds; more than that and ``check`` raises, as for a crash-looping service."""

    start: Callable[[], Any]
    say: Callable[[str], None]
    max_restarts: int = 3
    window: float = 60.0
    server: Any = None
    deaths: deque[float] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.server = self.start()

    @property
    def name(self) -> str:
        return str(self.server.name)

    def running(self) -> bool:
        return bool(self.server.running())

    def check(self, now: float | None = None) -> None:
        if self.server.running():
            return
        now = time.monotonic() if now is None else now
        while self.deaths and self.deaths[0] < now - self.window:
            self.deaths.popleft()
        self.deaths.append(now)
        if len(self.deaths) > self.max_restarts:
            raise RuntimeError(
                f"the embedded {self.name} server stopped {len(self.deaths)} times within "
                f"{self.window:.0f}s; giving up"
            )
        self.say(f"fluxpipe: the embedded {self.name} server stopped; starting it again on its data")
        self.server.stop()  # whatever is left of it (a PostgreSQL postmaster without its children)
        self.server = self.start()
        self.say(f"fluxpipe: {self.name} restarted")

    def stop(self) -> None:
        self.server.stop()
