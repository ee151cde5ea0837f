"""``fluxpipe up`` in a terminal: Ctrl-C reaches ``up`` alone, which stops the services, then NATS
and PostgreSQL, one line each and no traceback; started again on the same data folder, the
simulator is back at the same address with its queue, so a task caught in flight finishes; its
fault switches can be flipped on the running stack."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.common.embedded import free_port
from tests.test_e2e import alive, follow

pytestmark = pytest.mark.timeout(240)

SERVICES = ("simulator", "projector", "submitter", "poller", "uploader", "ledger", "gateway")


class TerminalUp:
    """``fluxpipe up`` as a shell runs it: the leader of its own foreground process group."""

    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir, self.port = data_dir, port
        self.url = f"http://127.0.0.1:{port}"
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("NATS_", "DATABASE_", "FAL_", "FLUXPIPE_"))
        }
        env |= {
            "FLUXPIPE_SIM_QUEUE_SECONDS": "0.2",
            "FLUXPIPE_SIM_RUN_SECONDS": "4",
            "FLUXPIPE_POLL_MAX": "0.5",
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "up", "--port", str(port), "--data-dir", str(data_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 120
        while not any(line.strip().startswith("token:") for line in self.lines):
            assert self.proc.poll() is None, "fluxpipe up exited:\n" + "".join(self.lines)
            assert time.monotonic() < deadline, "fluxpipe up never became ready:\n" + "".join(self.lines)
            time.sleep(0.1)
        token = next(line.split()[1] for line in self.lines if line.strip().startswith("token:"))
        self.auth = {"Authorization": f"Bearer {token}"}

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def processes(self) -> list[int]:
        """Every process ``up`` started directly, and the postmaster pgserver started."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        postmaster = (self.data_dir / "pg" / "postmaster.pid").read_text().split()[0]
        return [int(pid) for pid in (*children, postmaster)]

    def ctrl_c(self) -> int:
        """What a terminal does on Ctrl-C: SIGINT to the whole foreground process group."""
        os.killpg(self.proc.pid, signal.SIGINT)
        return self.proc.wait(90)


def flip_simulator_faults(data_dir: Path, faults: dict) -> None:
    """Set the fault switches of the simulator ``fluxpipe up`` runs on ``data_dir``: its port and
    key are in the data folder."""
    port = (data_dir / "simulator" / "port").read_text().strip()
    key = "sim-" + (data_dir / "simulator" / "fal-key").read_text().strip()
    response = httpx.put(
        f"http://127.0.0.1:{port}/_simulator/faults", json=faults, headers={"Authorization": f"Key {key}"}
    )
    assert response.status_code == 200, response.text


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A data folder outside pytest's own temporary root, which pytest keeps closed to other
    users whenever a session starts; pgserver, running as root, hands PostgreSQL to a user of
    its own that must reach the folder."""
    with tempfile.TemporaryDirectory(prefix="fluxpipe-up-") as folder:
        yield Path(folder)


def test_ctrl_c_stops_in_order_and_a_task_in_flight_finishes_after_a_restart(data_dir: Path) -> None:
    tmp_path = data_dir
    up = TerminalUp(tmp_path, free_port())
    try:
        with httpx.Client(base_url=up.url, headers=up.auth, timeout=10) as client:
            r = client.post("/api/flux/text-to-image", json={"prompt": "caught in flight", "seed": 3})
            task_id = r.json()["task_id"]
            follow(client, task_id, {"IN_PROGRESS"})
        sim_port = (tmp_path / "simulator" / "port").read_text()
        started = up.processes()
    finally:
        code = up.ctrl_c()
    output = "".join(up.lines)
    assert code == 0, output
    assert "Traceback" not in output, output
    said = [line.strip() for line in up.lines if line.startswith("fluxpipe: ")]
    assert sorted(said[: len(SERVICES)]) == sorted(f"fluxpipe: {name} stopped" for name in SERVICES), output
    assert sorted(said[len(SERVICES) :]) == ["fluxpipe: NATS stopped", "fluxpipe: PostgreSQL stopped"], output
    assert not [pid for pid in started if alive(pid)]

    again = TerminalUp(tmp_path, up.port)
    try:
        assert (tmp_path / "simulator" / "port").read_text() == sim_port
        with httpx.Client(base_url=again.url, headers=again.auth, timeout=10) as client:
            task, _ = follow(client, task_id, {"SUCCESS", "FAILED"})
            assert task["status"] == "SUCCESS", task
            assert task["cloud_image_url"]

            flip_simulator_faults(data_dir, {"runner_error_rate": 1.0})
            r = client.post("/api/flux/text-to-image", json={"prompt": "the runner drops"})
            failed, _ = follow(client, r.json()["task_id"], {"SUCCESS", "FAILED"})
            flip_simulator_faults(data_dir, {})
        assert failed["status"] == "FAILED" and "Runner disconnected" in failed["error_message"], failed
    finally:
        assert again.ctrl_c() == 0
