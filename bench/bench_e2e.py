"""What the event pipeline costs a user, beside a baseline measured in the same run (``make bench-e2e``).

Ours: the whole stack under ``fluxpipe up`` (embedded NATS and PostgreSQL, gateway, four
workers, the fal simulator), driven over HTTP. A task's latency runs from sending
``POST /api/flux/text-to-image`` to its ``task.images_stored`` event (the image is in our
storage), seen on a NATS subscription so that measuring adds no load to the gateway.

Baseline: the same work done directly in one process, with no events: submit to an identical
simulator with the same fal client, poll with the poller's adaptive policy, fetch the result,
download the image and write it to disk. Both sides share the provider's latency and the
polling policy, so the difference is what the pipeline adds.

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
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import nats

from services.common.embedded import free_port, wait_for_port
from services.common.fal import FalClient

KEY = "bench-key-id:5e0c2a9d41f7b3e6"
POLL_MIN, POLL_MAX = 0.5, 5.0  # the poller's defaults


def provider_env(queue: float, run: float) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "DATABASE_", "FAL_", "FLUXPIPE_"))
    }
    env.update(FAL_KEY=KEY, FLUXPIPE_SIM_QUEUE_SECONDS=str(queue), FLUXPIPE_SIM_RUN_SECONDS=str(run))
    return env


def start_stack(data_dir: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], str, str, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up", "--port", str(port), "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip().startswith("token:"):
            token = line.split()[1]
            break
    else:
        raise RuntimeError("fluxpipe up exited before it was ready")
    runtime = json.loads((data_dir / "runtime.json").read_text())
    return proc, runtime["GATEWAY_URL"], runtime["NATS_URL"], token


async def through_fluxpipe(gateway: str, nats_url: str, token: str, n: int, parallel: int) -> list[float]:
    stored: dict[str, asyncio.Future[float]] = {}
    nc = await nats.connect(nats_url)
    loop = asyncio.get_running_loop()

    async def on_stored(msg: nats.aio.msg.Msg) -> None:
        task_id = msg.subject.split(".")[2]
        stored.setdefault(task_id, loop.create_future())
        if not stored[task_id].done():
            stored[task_id].set_result(time.perf_counter())

    await nc.subscribe("flux.task.*.stored", cb=on_stored)
    async with httpx.AsyncClient(base_url=gateway, headers={"Authorization": f"Bearer {token}"}) as http:

        async def one(i: int) -> float:
            start = time.perf_counter()
            r = await http.post("/api/flux/text-to-image", json={"prompt": f"bench {i}", "seed": i})
            r.raise_for_status()
            task_id = r.json()["task_id"]
            done = stored.setdefault(task_id, loop.create_future())
            return await asyncio.wait_for(done, 120) - start

        latencies = await run_all(one, n, parallel)
    await nc.close()
    return latencies


async def directly(sim_url: str, out: Path, n: int, parallel: int) -> list[float]:
    async with FalClient(sim_url, KEY) as fal, httpx.AsyncClient() as http:

        async def one(i: int) -> float:
            start = time.perf_counter()
            handle = await fal.submit("fal-ai/flux-1/dev", {"prompt": f"bench {i}", "seed": i})
            interval, seen = POLL_MIN, None
            while (status := await fal.status(handle)).status != "COMPLETED":
                interval = POLL_MIN if status.status != seen else min(interval * 1.5, POLL_MAX)
                seen = status.status
                await asyncio.sleep(interval)
            result = await fal.result(handle.response_url)
            image = await http.get(result["images"][0]["url"])
            await asyncio.to_thread((out / f"{i}.jpg").write_bytes, image.content)
            return time.perf_counter() - start

        return await run_all(one, n, parallel)


async def run_all(one: Callable[[int], Awaitable[float]], n: int, parallel: int) -> list[float]:
    gate = asyncio.Semaphore(parallel)

    async def gated(i: int) -> float:
        async with gate:
            return await one(i)

    return list(await asyncio.gather(*(gated(i) for i in range(n))))


def summary(latencies: list[float], wall: float) -> str:
    q = statistics.quantiles(latencies, n=20)
    return (
        f"p50 {statistics.median(latencies):6.2f}s  p95 {q[18]:6.2f}s  {len(latencies) / wall:6.2f} tasks/s"
    )


async def measure(label: str, run: Awaitable[list[float]]) -> str:
    start = time.perf_counter()
    latencies = await run
    return f"  {label:<36}{summary(latencies, time.perf_counter() - start)}"


def main(n: int, parallel: int, queue: float, run: float) -> None:
    env = provider_env(queue, run)
    env["FLUXPIPE_MAX_CONCURRENT_TASKS"] = str(parallel)
    env["FLUXPIPE_RATE_JOBS"] = "0"  # one user posts every task: the per-user rate limit is off
    rounds = (("one at a time", n, 1), (f"{parallel} at a time", n * 4, parallel))
    rows: dict[str, list[str]] = {name: [] for name, _, _ in rounds}
    stacks = (("always", "fluxpipe, fsync each event (ours)"), ("default", "fluxpipe, NATS default sync"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for sync, label in stacks:
            stack, gateway, nats_url, token = start_stack(root / sync, {**env, "FLUXPIPE_NATS_SYNC": sync})
            try:
                asyncio.run(through_fluxpipe(gateway, nats_url, token, 3, 1))  # warm-up
                for name, count, width in rounds:
                    ours = through_fluxpipe(gateway, nats_url, token, count, width)
                    rows[name].append(asyncio.run(measure(label, ours)))
            finally:
                stack.send_signal(signal.SIGINT)
                stack.wait(60)
        sim_port = free_port()
        sim = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "run", "simulator", "--port", str(sim_port)],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port("127.0.0.1", sim_port, 30, sim)
            (root / "direct").mkdir()
            for name, count, width in rounds:
                base = directly(f"http://127.0.0.1:{sim_port}", root / "direct", count, width)
                rows[name].append(asyncio.run(measure("direct fal calls (baseline)", base)))
        finally:
            sim.send_signal(signal.SIGTERM)
            sim.wait(30)
    print(
        f"text-to-image, provider latency {queue:g}s queued + {run:g}s running, poll {POLL_MIN}-{POLL_MAX}s"
    )
    for name, count, _ in rounds:
        print(f"{count} tasks, {name}")
        print("\n".join(rows[name]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=20, help="tasks one at a time (4x that in parallel)")
    parser.add_argument("--parallel", type=int, default=20)
    parser.add_argument("--queue", type=float, default=0.0, help="simulated seconds in fal's queue")
    parser.add_argument("--run", type=float, default=1.0, help="simulated seconds of generation")
    args = parser.parse_args()
    main(args.tasks, args.parallel, args.queue, args.run)
