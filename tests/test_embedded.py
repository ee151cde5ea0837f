"""The embedded servers ``fluxpipe up`` and the tests start for themselves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

START_AND_WAIT = """
import sys, time
from pathlib import Path
from services.common.embedded import EmbeddedNats
server = EmbeddedNats.start(Path(sys.argv[1]))
print(server.proc.pid, flush=True)
time.sleep(120)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie has exited; only its parent has not reaped it
        return stat.read().split(") ")[1][0] != "Z"


@pytest.mark.skipif(sys.platform != "linux", reason="parent-death signal is Linux only")
def test_a_nats_server_dies_with_the_process_that_started_it(tmp_path):
    parent = subprocess.Popen(
        [sys.executable, "-c", START_AND_WAIT, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    nats_pid = int(parent.stdout.readline())
    assert alive(nats_pid)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 20
    while alive(nats_pid):
        assert time.monotonic() < deadline, "nats-server outlived the process that started it"
        time.sleep(0.05)
