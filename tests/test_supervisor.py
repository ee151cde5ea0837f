"""``fluxpipe up``'s supervisor on real child processes: restart what dies, give up on a crash loop."""

from __future__ import annotations

import sys
import time

import pytest

from services.common.supervisor import KeptServer, Supervisor


def script(code: str):
    return lambda name, args: [sys.executable, "-c", code]


def wait_exit(supervisor: Supervisor) -> None:
    deadline = time.monotonic() + 10
    while not supervisor.exited():
        assert time.monotonic() < deadline, "the child never exited"
        time.sleep(0.02)


def test_a_child_that_dies_is_restarted_after_a_backoff():
    said: list[str] = []
    supervisor = Supervisor({}, said.append, command=script("import sys; sys.exit(3)"))
    first = supervisor.spawn("poller")
    wait_exit(supervisor)
    supervisor.check(now=100.0)
    assert said == ["fluxpipe: poller exited with code 3; restarting it in 1s"]
    supervisor.check(now=100.5)
    assert supervisor.children[0].proc is first, "restarted before its backoff"
    supervisor.check(now=101.0)
    assert supervisor.children[0].proc is not first and said[-1] == "fluxpipe: poller restarted"
    wait_exit(supervisor)
    supervisor.check(now=102.0)
    assert said[-1].endswith("restarting it in 2s")  # the backoff doubles


def test_a_crash_loop_stops_the_stack_naming_the_service():
    supervisor = Supervisor({}, lambda _: None, max_restarts=3, command=script("import sys; sys.exit(7)"))
    supervisor.spawn("uploader")
    now = 0.0
    with pytest.raises(RuntimeError, match="uploader exited with code 7 3 times within 60s"):
        for _ in range(10):
            wait_exit(supervisor)
            supervisor.check(now=now)
            now += 5
            supervisor.check(now=now)


def test_deaths_outside_the_window_are_forgiven():
    supervisor = Supervisor({}, lambda _: None, max_restarts=2, command=script("pass"))
    supervisor.spawn("projector")
    for now in (0.0, 100.0, 200.0, 300.0):  # one death every 100 s: never a crash loop
        wait_exit(supervisor)
        supervisor.check(now=now)
        supervisor.check(now=now + 30)


def test_stop_ends_children_that_ignore_sigterm():
    supervisor = Supervisor(
        {},
        lambda _: None,
        command=script("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"),
    )
    proc = supervisor.spawn("gateway")
    time.sleep(0.3)
    supervisor.stop(timeout=0.5)
    assert proc.returncode is not None


class FakeServer:
    name = "NATS"

    def __init__(self) -> None:
        self.alive = True

    def running(self) -> bool:
        return self.alive

    def stop(self) -> None:
        self.alive = False


def test_a_dead_embedded_server_is_started_again_until_it_crash_loops():
    said: list[str] = []
    made: list[FakeServer] = []

    def start() -> FakeServer:
        made.append(FakeServer())
        return made[-1]

    kept = KeptServer(start, said.append, max_restarts=2, window=60)
    kept.check(now=0.0)
    assert len(made) == 1 and said == []  # alive: nothing to do
    made[-1].alive = False
    kept.check(now=1.0)
    assert len(made) == 2 and said[-1] == "fluxpipe: NATS restarted"
    made[-1].alive = False
    kept.check(now=2.0)
    made[-1].alive = False
    with pytest.raises(RuntimeError, match="stopped 3 times within 60s; giving up"):
        kept.check(now=3.0)
    made[-1].alive = False
    kept.deaths.clear()
    kept.check(now=200.0)  # deaths long ago are forgiven
    assert made[-1].alive


@pytest.mark.parametrize("service", ["submitter", "projector", "gateway"])
def test_a_service_still_reaching_nats_stops_at_once_on_sigterm(service: str, tmp_path):
    """Before it has reached NATS (retried forever) a service has nothing to finish: a stop
    must end it, or it would outlive its supervisor. (The gateway's start-up then fails:
    uvicorn's exit code 3.)"""
    import os
    import signal
    import subprocess

    from services.common.embedded import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "DATABASE_", "FLUXPIPE_"))}
    env.update(
        NATS_URL=f"nats://127.0.0.1:{free_port()}",
        FLUXPIPE_JWT_SECRET="s" * 32,
        FLUXPIPE_IDEMPOTENCY_SECRET="i" * 32,
        FAL_KEY="k",
    )
    port = ["--port", str(free_port())] if service == "gateway" else []
    log = tmp_path / "log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "run", service, *port], env=env, stderr=err
        )
    try:
        deadline = time.monotonic() + 60
        while "Connection refused" not in log.read_text():  # it is retrying the connect
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == (3 if service == "gateway" else 0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_child_runs_at_the_priority_it_was_given():
    import os

    said: list[str] = []
    code = "import os, sys; sys.exit(os.nice(0))"  # its own niceness, as the exit code
    supervisor = Supervisor({}, said.append, command=script(code))
    mine = os.nice(0)
    supervisor.spawn("poller", nice=5)
    supervisor.spawn("gateway")
    wait_exit(supervisor)
    for child in supervisor.children:
        assert child.proc is not None
        child.proc.wait(10)
    codes = {c.name: c.proc.returncode for c in supervisor.children if c.proc is not None}
    assert codes == {"poller": min(mine + 5, 19), "gateway": mine}
