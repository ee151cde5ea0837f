"""``fluxpipe up`` keeps its embedded PostgreSQL alive: SIGKILLed, it is started again on its
data folder, the services reconnect, and a new task succeeds (the NATS case is in
tests/test_e2e.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.test_e2e import Stack, follow

pytestmark = pytest.mark.timeout(240)


def postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "pg" / "postmaster.pid").read_text().split()[0])


def test_a_killed_embedded_postgres_is_started_again_and_the_stack_goes_on(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    stack = Stack(data_dir)  # its own: it kills a part of it
    try:
        with httpx.Client(base_url=stack.url, headers=stack.auth, timeout=10) as client:
            r = client.post("/api/flux/text-to-image", json={"prompt": "before the kill"})
            assert r.status_code == 202, r.text
            before_task, _ = follow(client, r.json()["task_id"], {"SUCCESS", "FAILED"})
            assert before_task["status"] == "SUCCESS", before_task

            # A stack that was SIGKILLed before left its pid on pgserver's list of users of this
            # data folder (it never forgets one); the restart must not hand back the dead server.
            users = data_dir / "pg" / ".handle_pids.json"
            dead = subprocess.Popen(["true"])
            dead.wait()
            users.write_text(json.dumps([dead.pid, *json.loads(users.read_text())]))
            before = postmaster_pid(data_dir)
            os.kill(before, signal.SIGKILL)
            deadline = time.monotonic() + 90
            while "fluxpipe: PostgreSQL restarted" not in stack.output:
                assert stack.proc.poll() is None, "fluxpipe up gave up:\n" + stack.output
                assert time.monotonic() < deadline, "PostgreSQL was not started again:\n" + stack.output
                time.sleep(0.2)
            assert postmaster_pid(data_dir) != before

            deadline = time.monotonic() + 60
            while True:  # the gateway may answer 503 while its pool reconnects
                r = client.post(
                    "/api/flux/text-to-image",
                    json={"prompt": "after the restart"},
                    headers={"Idempotency-Key": "pg-restart"},
                )
                if r.status_code not in (500, 503) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert r.status_code == 202, r.text
            task, _ = follow(client, r.json()["task_id"], {"SUCCESS", "FAILED"})
            assert task["status"] == "SUCCESS", task
            # the data from before the kill is still there, read through the restarted server
            got = client.get(f"/api/flux/task/{before_task['id']}")
            assert got.status_code == 200 and got.json()["status"] == "SUCCESS", got.text
    finally:
        stack.stop()
