"""The pipeline at scale: throughput, CPU per task and memory, each beside a baseline (issue 10).

``python -m bench.bench_scale --tasks 1000 --tasks 10000`` runs, for each count:

- **ours**: the whole stack under ``fluxpipe up`` (embedded NATS and PostgreSQL, gateway, five
  workers), the fal simulator in benchmark mode (zero latency, pre-drawn images), driven by
  ``--clients`` HTTP clients in a closed loop spread over ``--users`` users. A task counts as
  done when its ``flux_tasks`` row is SUCCESS with the stored image's URL, i.e. the image is in
  our storage and the read model is updated. Prints tasks/s, submit latency, and the CPU
  seconds each process used, per task (the simulator and this harness apart).
- **baseline**: raw JetStream on a fresh embedded NATS with the same sync setting: publish the
  same number of events the run produced (same size), 64 in flight with awaited acks, while a
  pull consumer fetches and acks them; tasks/s is that rate divided by the events per task.

``--memory`` instead measures RSS: the simulator holds every job for 10 minutes, the submitter
lets 1,000 tasks be at fal at once, and 11,000 tasks are submitted, so 10,000 wait and 1,000
are in flight; then each process's RSS is printed.

Prints figures only; nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import nats
import psutil

from services.common.auth import issue_token
from services.common.embedded import EmbeddedNats, free_port
from services.common.settings import Settings

EVENT_BYTES = 600  # the size of a typical event (measured from the stream after a run)


@dataclass
class Stack:
    proc: subprocess.Popen[str]
    gateway: str
    nats_url: str
    database_url: str
    secret: str
    data_dir: Path

    def processes(self) -> dict[str, list[psutil.Process]]:
        """Every process of the stack by role: the services, nats-server and PostgreSQL."""
        roles: dict[str, list[psutil.Process]] = {}
        root = psutil.Process(self.proc.pid)
        for p in root.children(recursive=True):
            try:
                cmd = p.cmdline()
            except psutil.Error:
                continue
            if "run" in cmd and "services.cli" in cmd:
                role = cmd[cmd.index("run") + 1]
            elif cmd and cmd[0].endswith("nats-server"):
                role = "nats-server"
            else:
                continue
            roles.setdefault(role, []).append(p)
        for p in psutil.process_iter(["name", "cmdline"]):
            cmd = p.info["cmdline"] or []
            if p.info["name"] == "postgres" and "-D" in cmd and str(self.data_dir) in " ".join(cmd):
                roles.setdefault("postgres", []).extend([p, *p.children(recursive=True)])
        return roles


def per_role(
    procs: dict[str, list[psutil.Process]], measure: Callable[[psutil.Process], float]
) -> dict[str, float]:
    """``measure`` summed over each role's processes (a process gone meanwhile counts 0)."""
    out: dict[str, float] = {}
    for role, ps in procs.items():
        total = 0.0
        for p in ps:
            try:
                total += measure(p)
            except psutil.Error:
                pass
        out[role] = total
    return out


def cpu_seconds(procs: dict[str, list[psutil.Process]]) -> dict[str, float]:
    return per_role(procs, lambda p: sum(p.cpu_times()[:2]))


def rss(procs: dict[str, list[psutil.Process]]) -> dict[str, float]:
    """MB resident per role."""
    return per_role(procs, lambda p: p.memory_info().rss / 2**20)


@contextmanager
def stack(data_dir: Path, env: dict[str, str]) -> Iterator[Stack]:
    data_dir.mkdir(parents=True)
    log = (data_dir.parent / "stack.log").open("w")  # what the stack said, for a failed run
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up", "--port", str(free_port()), "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip().startswith("token:"):
                break
        else:
            raise RuntimeError("fluxpipe up exited before it was ready")
        runtime = json.loads((data_dir / "runtime.json").read_text())
        secret = (data_dir / "jwt-secret").read_text().strip()
        yield Stack(
            proc, runtime["GATEWAY_URL"], runtime["NATS_URL"], runtime["DATABASE_URL"], secret, data_dir
        )
    except BaseException:
        log.flush()
        print((data_dir.parent / "stack.log").read_text()[-4000:], file=sys.stderr)
        raise
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(120)
        log.close()


def base_env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "DATABASE_", "FAL_", "FLUXPIPE_"))
    }
    env.update(
        FLUXPIPE_RATE_JOBS="0",  # a few users post every task: the per-user rate limit is off
        FLUXPIPE_LOG_LEVEL="WARNING",
        **extra,
    )
    return env


async def submit_all(
    s: Stack, n: int, clients: int, users: int, tag: str
) -> tuple[list[str], list[float], float]:
    """Post ``n`` jobs with ``clients`` closed-loop clients; the task ids, latencies and start."""
    settings = Settings(FLUXPIPE_JWT_SECRET=s.secret)
    tokens = [issue_token(settings, f"bench-{u}") for u in range(users)]
    ids: list[str] = []
    latencies: list[float] = []
    counter = iter(range(n))
    # uvicorn closes a connection idle for 5 s: never reuse one idle for 2 (a request sent on a
    # connection the server is closing fails with ReadError)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients, keepalive_expiry=2)
    async with httpx.AsyncClient(base_url=s.gateway, limits=limits, timeout=60) as http:

        async def client() -> None:
            for i in counter:
                body = {"prompt": f"{tag} {i}", "seed": i}
                headers = {"Authorization": f"Bearer {tokens[i % users]}"}
                t0 = time.perf_counter()
                r = await http.post("/api/flux/text-to-image", json=body, headers=headers)
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 202 and r.status_code != 200:
                    raise RuntimeError(f"submit {i}: {r.status_code} {r.text[:200]}")
                ids.append(r.json()["task_id"])

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
    return ids, latencies, start


async def wait_done(database_url: str, n: int, tag: str, timeout: float) -> float:
    """Until ``n`` tasks of this run are SUCCESS with their stored image; when that happened."""
    conn = await asyncpg.connect(database_url)
    try:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            done = await conn.fetchval(
                "SELECT count(*) FROM flux_tasks WHERE status = 'SUCCESS' AND cloud_image_url IS NOT NULL"
                " AND prompt LIKE $1",
                f"{tag} %",
            )
            if done >= n:
                return time.perf_counter()
            await asyncio.sleep(0.05)
        raise TimeoutError(f"only {done} of {n} tasks done after {timeout}s")
    finally:
        await conn.close()


async def raw_jetstream(root: Path, events: int, size: int, sync_always: bool) -> tuple[float, float]:
    """Seconds to publish ``events`` events (64 awaited acks in flight) while a pull consumer
    fetches and acks them, on a fresh embedded NATS; and the CPU seconds nats-server used."""
    server = EmbeddedNats.start(root / "raw-nats", sync_always=sync_always)
    nats_cpu = {"nats-server": [psutil.Process(server.proc.pid)]}
    try:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await js.add_stream(name="RAW", subjects=["raw.>"])
        sub = await js.pull_subscribe("raw.>", durable="raw")
        payload = b"x" * size
        received = 0

        async def consume() -> None:
            nonlocal received
            while received < events:
                try:
                    msgs = await sub.fetch(256, timeout=1)
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
                for m in msgs:
                    await m.ack()
                received += len(msgs)

        async def publish(worker: int) -> None:
            for i in range(worker, events, 64):
                await js.publish(f"raw.task.{i // 6}", payload)

        start, cpu = time.perf_counter(), cpu_seconds(nats_cpu)["nats-server"]
        await asyncio.gather(consume(), *(publish(w) for w in range(64)))
        elapsed = time.perf_counter() - start
        cpu = cpu_seconds(nats_cpu)["nats-server"] - cpu
        await nc.close()
        return elapsed, cpu
    finally:
        server.stop()


def run_throughput(n: int, clients: int, users: int, sync: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env = base_env(
            FLUXPIPE_SIM_BENCHMARK="true",
            FLUXPIPE_MAX_CONCURRENT_TASKS="64",
            FLUXPIPE_NATS_SYNC=sync,
            FLUXPIPE_POLL_MIN="0.1",
        )
        with stack(root / "stack", env) as s:
            asyncio.run(warm_up(s, users))
            procs = s.processes()  # after the warm-up, so the services' database sessions exist
            before = cpu_seconds(procs)
            me_before = sum(psutil.Process().cpu_times()[:2])
            ids, latencies, start = asyncio.run(submit_all(s, n, clients, users, "scale"))
            end = asyncio.run(wait_done(s.database_url, n, "scale", timeout=max(600, n)))
            after = cpu_seconds(procs)
            me = sum(psutil.Process().cpu_times()[:2]) - me_before
            per_task, size = asyncio.run(stream_shape(s, n + 4))
        elapsed = end - start
        raw, raw_cpu = asyncio.run(raw_jetstream(root, int(n * per_task), size, sync_always=sync == "always"))
    q = statistics.quantiles(latencies, n=100)
    print(f"\n{n} tasks, {clients} clients over {users} users, NATS sync={sync}, simulator in benchmark mode")
    print(f"  fluxpipe, submit to SUCCESS + stored (ours)  {n / elapsed:8.1f} tasks/s   {elapsed:7.1f}s")
    print(
        f"  raw JetStream, {per_task:.1f} events/task of {size} B    {n / raw:8.1f} tasks/s   {raw:7.1f}s"
        f"   ({n * per_task / raw:,.0f} events/s, baseline)"
    )
    print(
        f"  submit latency p50 {statistics.median(latencies) * 1000:.0f} ms"
        f"  p99 {q[98] * 1000:.0f} ms  max {max(latencies) * 1000:.0f} ms"
    )
    print("  CPU per task, ms:")
    total = 0.0
    for role in sorted(after, key=lambda r: -(after[r] - before.get(r, 0))):
        used = after[role] - before.get(role, 0.0)
        apart = role == "simulator"
        if not apart:
            total += used
        note = "   (apart: the provider)" if apart else ""
        if role == "nats-server":
            note = f"   (raw JetStream, the same events: {raw_cpu / n * 1000:.2f})"
        print(f"    {role:<12}{used / n * 1000:8.2f}{note}")
    print(f"    {'total':<12}{total / n * 1000:8.2f}   (ours: services, NATS, PostgreSQL)")
    print(f"    {'harness':<12}{me / n * 1000:8.2f}   (apart: the HTTP clients and this bench)")


async def stream_shape(s: Stack, n: int) -> tuple[float, int]:
    """Events per task and bytes per event in the stack's stream (read as the admin user)."""
    users = json.loads((s.data_dir / "nats-users.json").read_text())
    nc = await nats.connect(s.nats_url, user="operator", password=users["operator"])
    try:
        info = await nc.jetstream().stream_info("FLUX")
        return info.state.messages / n, info.state.bytes // max(info.state.messages, 1)
    finally:
        await nc.close()


async def warm_up(s: Stack, users: int) -> None:
    ids, _, _ = await submit_all(s, 4, 2, 2, "warm")
    await wait_done(s.database_url, 4, "warm", timeout=120)


def run_memory(waiting: int, in_flight: int, clients: int, users: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env = base_env(
            FLUXPIPE_SIM_QUEUE_SECONDS="0",
            FLUXPIPE_SIM_RUN_SECONDS="600",
            FLUXPIPE_MAX_CONCURRENT_TASKS=str(in_flight),
            FLUXPIPE_TASK_TIMEOUT="3600",
        )
        with stack(root / "stack", env) as s:
            procs = s.processes()
            idle = rss(procs)
            n = waiting + in_flight
            start = time.perf_counter()
            asyncio.run(submit_all(s, n, clients, users, "memory"))
            submitted = time.perf_counter() - start
            asyncio.run(wait_running(s.database_url, in_flight))
            loaded = rss(procs)
    print(f"\nRSS with {waiting} tasks waiting and {in_flight} at fal (submitted in {submitted:.0f}s), MB")
    for role in sorted(loaded):
        print(f"  {role:<12}{loaded[role]:8.1f}   idle {idle.get(role, 0):6.1f}")


async def wait_running(database_url: str, in_flight: int) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        while (
            await conn.fetchval("SELECT count(*) FROM flux_tasks WHERE status IN ('IN_QUEUE', 'IN_PROGRESS')")
            < in_flight
        ):
            await asyncio.sleep(0.5)
    finally:
        await conn.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, action="append", help="task counts (repeatable)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--sync", choices=("always", "default"), default="always")
    parser.add_argument("--memory", action="store_true", help="RSS with 10,000 waiting, 1,000 at fal")
    args = parser.parse_args()
    if args.memory:
        run_memory(10_000, 1_000, args.clients, args.users)
    else:
        for count in args.tasks or [1000]:
            run_throughput(count, args.clients, args.users, args.sync)
