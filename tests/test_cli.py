"""The operator commands when there is no stack to talk to: one clear line, exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def fluxpipe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {"PATH": "/usr/bin:/bin", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args], capture_output=True, text=True, env=clean, timeout=60
    )


def test_token_without_a_secret_says_where_it_looked(tmp_path: Path) -> None:
    r = fluxpipe("token", "--user", "alice", "--data-dir", str(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"no signing secret: {tmp_path}/jwt-secret does not exist" in r.stderr


def test_events_never_guesses_a_server_when_no_stack_runs_here(tmp_path: Path) -> None:
    r = fluxpipe("events", "abc", "--data-dir", str(tmp_path))
    assert r.returncode == 2 and f"no running fluxpipe up found in {tmp_path}/" in r.stderr


def test_a_runtime_file_left_by_a_killed_stack_is_ignored(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    (tmp_path / "runtime.json").write_text(
        json.dumps({"NATS_URL": "nats://127.0.0.1:1", "pid": int(dead.stdout)})
    )
    r = fluxpipe("status", "--data-dir", str(tmp_path))
    assert r.returncode == 2 and "no running fluxpipe up found" in r.stderr


def test_an_unreachable_nats_is_one_line_not_a_retry_loop(tmp_path: Path) -> None:
    r = fluxpipe("events", "abc", "--data-dir", str(tmp_path), env={"NATS_URL": "nats://127.0.0.1:1"})
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "fluxpipe: cannot reach NATS at nats://127.0.0.1:1 (NoServersError); is the stack running?"
    ]
