"""How fast a finished job shows up, and what it costs at fal: webhooks against polling.

For each way of noticing completion, the whole stack runs under ``fluxpipe up`` (embedded NATS
and PostgreSQL, gateway, four workers) against one fal simulator running in this process on a
real socket, so its clock and its request log are ours to read:

- **latency**: from the moment fal finished a job (the simulator's own completion time) to the
  task reading SUCCESS in the read model (``flux_tasks``, polled every 10 ms from here);
- **provider calls per task**: every HTTP call the stack made to fal (submit, status, result,
  cancel), counted by the simulator's front door, divided by the tasks.

Each job's generation time is spread over 0.5x-1.4x of ``--run`` (by its seed), as real jobs
vary, so that no polling period happens to line up with every job.

Modes, measured in the same run with the same simulated provider latency:
``webhook`` (fal's signed webhook to the gateway; polling only as a fallback at
``FLUXPIPE_POLL_MAX``), ``adaptive`` (our default polling, 0.5 s growing to 5 s), ``fixed 5s``
(the original plan: every 5 s) and ``100 ms`` (an eager poller).

Prints figures only; nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from starlette.types import ASGIApp, Receive, Scope, Send

from bench.bench_e2e import start_stack
from services.common.embedded import free_port
from services.simulator.app import SimulatorSettings, create_app
from tests.simulator_server import serve

KEY = "bench-key-id:9a1f3c5e7b2d4f60"

MODES: dict[str, dict[str, str]] = {
    "webhook": {},  # the webhook settings are added once the gateway's port is known
    "adaptive (0.5-5 s)": {"FLUXPIPE_POLL_MIN": "0.5", "FLUXPIPE_POLL_MAX": "5"},
    "fixed 5 s (the plan)": {"FLUXPIPE_POLL_MIN": "5", "FLUXPIPE_POLL_MAX": "5"},
    "fixed 100 ms": {"FLUXPIPE_POLL_MIN": "0.1", "FLUXPIPE_POLL_MAX": "0.1"},
}


@dataclass
class CountingFront:
    """The simulator behind a door that counts every queue call (not image downloads or JWKS)."""

    app: ASGIApp
    calls: Counter[str] = field(default_factory=Counter)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path, method = scope["path"], scope["method"]
            if not path.startswith(("/files/", "/.well-known/")):
                kind = {"POST": "submit", "PUT": "cancel"}.get(method)
                kind = kind or ("status" if path.endswith("/status") else "result")
                self.calls[kind] += 1
        await self.app(scope, receive, send)


@contextmanager
def simulator(queue: float, run: float) -> Iterator[tuple[str, Any, CountingFront]]:
    holder: list[tuple[Any, CountingFront]] = []

    def build(base_url: str) -> ASGIApp:
        app = create_app(
            SimulatorSettings(api_key=KEY, public_url=base_url, queue_seconds=queue, run_seconds=run)
        )
        front = CountingFront(app)
        holder.append((app, front))
        return front

    with serve(build) as url:
        sim = holder[0][0].state.simulator
        submit = sim.submit

        def varied(app_path: str, model_id: str, arguments: dict[str, Any], *rest: Any) -> Any:
            # Real jobs do not all take the same time: spread each one's generation over
            # 0.5x-1.4x of ``run`` by its seed, so no polling period lines up with every job.
            sim.settings.run_seconds = run * (0.5 + (int(arguments.get("seed") or 0) % 10) / 10)
            return submit(app_path, model_id, arguments, *rest)

        sim.submit = varied
        yield url, sim, holder[0][1]


async def run_tasks(gateway: str, token: str, database_url: str, sim: Any, n: int) -> list[float]:
    """Submit ``n`` jobs at once; per task, seconds from fal finishing to SUCCESS in the read model."""
    async with httpx.AsyncClient(base_url=gateway, headers={"Authorization": f"Bearer {token}"}) as http:
        answers = await asyncio.gather(
            *(
                http.post("/api/flux/text-to-image", json={"prompt": f"bench {i}", "seed": i})
                for i in range(n)
            )
        )
    ids = [a.json()["task_id"] for a in answers]
    seen: dict[str, tuple[str, float]] = {}
    conn = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + 600
        while len(seen) < n and time.monotonic() < deadline:
            rows = await conn.fetch(
                "select id, request_id, status from flux_tasks where id = any($1::text[])", ids
            )
            now = time.time()  # the simulator's clock: wall time
            for row in rows:
                if row["id"] not in seen and row["status"] in ("SUCCESS", "FAILED", "CANCELLED"):
                    if row["status"] != "SUCCESS":
                        raise RuntimeError(f"task {row['id']} ended {row['status']}")
                    seen[row["id"]] = (row["request_id"], now)
            await asyncio.sleep(0.01)
    finally:
        await conn.close()
    if len(seen) < n:
        raise RuntimeError(f"only {len(seen)} of {n} tasks finished")
    return [at - sim.requests[request_id].done_at for request_id, at in seen.values()]


def measure(name: str, extra: dict[str, str], n: int, queue: float, run: float, root: Path) -> str:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "DATABASE_", "FAL_", "FLUXPIPE_"))
    }
    port = free_port()
    with simulator(queue, run) as (sim_url, sim, front):
        env.update(FAL_KEY=KEY, FAL_BASE_URL=sim_url, FLUXPIPE_MAX_CONCURRENT_TASKS="5", **extra)
        if name == "webhook":
            env.update(
                FLUXPIPE_WEBHOOK_BASE_URL=f"http://127.0.0.1:{port}",
                FAL_JWKS_URL=f"{sim_url}/.well-known/jwks.json",
            )
        data_dir = root / name.split()[0]
        proc, _, _, token = start_stack(data_dir, env, port)
        try:
            database_url = json.loads((data_dir / "runtime.json").read_text())["DATABASE_URL"]
            gateway = f"http://127.0.0.1:{port}"
            asyncio.run(run_tasks(gateway, token, database_url, sim, 2))  # warm-up
            front.calls.clear()
            latencies = asyncio.run(run_tasks(gateway, token, database_url, sim, n))
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
    q = statistics.quantiles(latencies, n=20)
    calls = sum(front.calls.values()) / n
    detail = ", ".join(f"{kind} {count / n:.1f}" for kind, count in sorted(front.calls.items()))
    return (
        f"  {name:<22} p50 {statistics.median(latencies):5.2f}s  p95 {q[18]:5.2f}s  "
        f"max {max(latencies):5.2f}s  calls/task {calls:5.1f}  ({detail})"
    )


def main(n: int, queue: float, run: float) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in MODES.items():
            rows.append(measure(name, extra, n, queue, run, Path(tmp)))
            print(rows[-1], flush=True)
    print(f"\n{n} tasks per mode, 5 at fal at once, provider {queue:g}s queued + {run:g}s running")
    print("fal finished -> SUCCESS in flux_tasks, and provider calls per task")
    print("\n".join(rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--queue", type=float, default=0.5, help="simulated seconds in fal's queue")
    parser.add_argument("--run", type=float, default=3.0, help="simulated seconds of generation")
    args = parser.parse_args()
    main(args.tasks, args.queue, args.run)
