"""Submit latency at a fixed rate, with the workers busy (``python -m bench.bench_submit``).

Ours: the whole stack under ``fluxpipe up`` (embedded NATS and PostgreSQL, the gateway, the
workers, the fal simulator in benchmark mode: no provider latency, pre-drawn images), so
every accepted job is really submitted, polled, stored and projected while the load runs. An
open-loop generator sends ``POST /api/flux/text-to-image`` at a fixed rate: each send is
scheduled by the clock (request i at ``start + i / rate``), never after an answer, and its
latency runs from that scheduled time to the end of the answer. A gateway that stalls is
therefore charged for every request that should have gone out meanwhile
(coordinated-omission-safe).

Limits: the per-user job rate limit stays on at its default (60 jobs a minute): its work
(a read and a compare-and-set on the JetStream KV bucket) is paid on every request in
production, so it is measured. The load is spread round-robin over ``--users`` users (a
token each), so that no user passes it: 200 users x 25 s at 200/s is 25 jobs per user. Credits
and the per-user in-flight cap are off (their defaults); ``--max-per-user N`` turns the cap on
(the ledger hold: one more read and one more fsync'd publish per request).

Baseline, in the same run on the same servers: the same generator against a minimal
FastAPI/uvicorn endpoint (``--serve-baseline``) that does the irreducible work of a submit:
parse the JSON body, build the same ``TaskRequested`` event and publish it to the stack's
stream with an awaited ack (so it is fsync'd like ours, and the workers really process these
tasks too). No auth, no rate limit, no validation beyond the event's own. The baseline runs
uvicorn with uvloop and httptools when they are installed.

Also printed: CPU seconds per request of the answering process (from ``/proc/<pid>/stat``),
of the whole stack (every process under ``fluxpipe up``, NATS and PostgreSQL included), and
of this generator itself (so one can see it is not the bottleneck); the load average; and how
many tasks the workers stored during the window.

Prints figures only; nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import nats
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from nats.aio.msg import Msg

from bench.bench_e2e import provider_env, start_stack
from schemas.events import TaskRequested, TaskRequestedData
from services.common.auth import issue_token
from services.common.bus import Bus
from services.common.embedded import free_port, wait_for_port
from services.common.nats_auth import OPERATOR, USERS_FILE
from services.common.settings import Settings

PATH = "/api/flux/text-to-image"
CLK_TCK = os.sysconf("SC_CLK_TCK")
STALE = 2.0  # seconds idle after which a pooled connection is not reused (uvicorn closes at 5)


# --- a small HTTP/1.1 keep-alive client: cheap enough not to be what is measured -------------


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.used = time.monotonic()

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def send(self, request: bytes) -> tuple[int, bytes]:
        """One request on this connection; the status and body of the answer."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        body = await self.reader.readexactly(length) if length else b""
        self.used = time.monotonic()
        return status, body

    def close(self) -> None:
        self.writer.close()


def post(host: str, path: str, body: bytes, token: str | None) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)  # seconds, from the scheduled send
    statuses: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    transport_errors: int = 0
    late_sends: int = 0  # sends the generator itself started more than 1 ms behind schedule
    connections: int = 0
    task_ids: list[str] = field(default_factory=list)


async def open_loop(
    host: str, port: int, requests: list[bytes], rate: float, warm: int = 64, most: int = 1024
) -> Result:
    """Send ``requests`` at ``rate`` per second by the clock, each on an idle keep-alive
    connection (a new one when none is idle, up to ``most``); latency from the scheduled time."""
    result = Result()
    idle = [await Connection.open(host, port) for _ in range(warm)]
    result.connections = len(idle)
    freed = asyncio.Condition()
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()

    async def one(request: bytes, scheduled: float) -> None:
        while idle and time.monotonic() - idle[-1].used > STALE:  # the server may have closed it
            idle.pop().close()
            result.connections -= 1
        if idle:
            conn = idle.pop()
        elif result.connections < most:
            result.connections += 1
            conn = await Connection.open(host, port)
        else:
            async with freed:
                await freed.wait_for(lambda: bool(idle))
            conn = idle.pop()
        try:
            status, body = await conn.send(request)
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            result.transport_errors += 1
            if len(result.errors) < 20:
                result.errors.append(repr(exc))
            conn.close()
            result.connections -= 1
            return
        result.latencies.append(loop.time() - scheduled)
        result.statuses[status] = result.statuses.get(status, 0) + 1
        if status == 202:
            result.task_ids.append(json.loads(body)["task_id"])
        elif len(result.errors) < 20:
            result.errors.append(f"{status} {body[:200]!r}")
        idle.append(conn)
        async with freed:
            freed.notify()

    start = loop.time() + 0.05
    for i, request in enumerate(requests):
        scheduled = start + i / rate
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.001:
            result.late_sends += 1
        task = asyncio.create_task(one(request, scheduled))
        pending.add(task)
        task.add_done_callback(pending.discard)
    while pending:
        await asyncio.wait(set(pending))
    for conn in idle:
        conn.close()
    return result


# --- CPU time of processes, from /proc ---------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (its own, not its children's)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def find_gateway(root: int) -> int:
    for pid in descendants(root):
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"run" in cmdline and b"gateway" in cmdline:
                return pid
    raise RuntimeError("no gateway process under fluxpipe up")


def tree_cpu(root: int) -> float:
    return sum(cpu_seconds(pid) for pid in descendants(root))


# --- the baseline: the irreducible work of a submit -----------------------------------------


def serve_baseline(port: int) -> None:
    import uvicorn

    settings = Settings()
    app = FastAPI()

    @app.on_event("startup")
    async def connect() -> None:
        app.state.bus = await Bus.connect(settings, "bench-baseline")

    @app.post("/publish")
    async def publish(request: Request) -> JSONResponse:
        body = json.loads(await request.body())
        data = TaskRequestedData(model=settings.default_model, task_type="text_to_image", **body)
        event = TaskRequested(task_id=uuid.uuid4().hex, user_id="bench-baseline", data=data)
        await app.state.bus.publish(event)
        return JSONResponse({"task_id": event.task_id, "status": "PENDING"}, status_code=202)

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def start_baseline(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.bench_submit", "--serve-baseline", str(port)],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port("127.0.0.1", port, 120, server)
    except BaseException:
        server.kill()
        raise
    return server, port


# --- one measured run -------------------------------------------------------------------------


@dataclass
class Row:
    label: str
    result: Result
    wall: float
    process_cpu: float
    stack_cpu: float
    generator_cpu: float
    stored: int
    load: tuple[float, float, float]

    def line(self) -> str:
        lat = sorted(self.result.latencies)
        n = len(lat)

        def q(p: float) -> float:
            return lat[min(n - 1, int(p * n))] * 1000 if n else float("nan")

        bad = n - self.result.statuses.get(202, 0) + self.result.transport_errors
        return (
            f"  {self.label:<34} p50 {q(0.50):7.1f}  p90 {q(0.90):7.1f}  p99 {q(0.99):7.1f}  "
            f"max {lat[-1] * 1000 if n else float('nan'):7.1f} ms  {n / self.wall:6.1f} req/s  "
            f"errors {bad}\n"
            f"  {'':<34} cpu/request: server {self.process_cpu / max(n, 1) * 1000:5.2f} ms, "
            f"stack {self.stack_cpu / max(n, 1) * 1000:5.2f} ms, generator "
            f"{self.generator_cpu / max(n, 1) * 1000:5.2f} ms; stored during window {self.stored}; "
            f"late sends {self.result.late_sends}; connections {self.result.connections}; "
            f"load {self.load[0]:.1f}"
        ) + (f"\n  {'':<34} first errors: {self.result.errors[:3]}" if self.result.errors else "")


class StoredCounter:
    def __init__(self) -> None:
        self.count = 0

    async def on_stored(self, msg: Msg) -> None:
        self.count += 1


async def measured(
    label: str,
    host: str,
    port: int,
    requests: list[bytes],
    rate: float,
    server_pid: int,
    stack_pid: int,
    counter: StoredCounter,
) -> Row:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    before = (cpu_seconds(server_pid), tree_cpu(stack_pid), usage.ru_utime + usage.ru_stime, counter.count)
    started = time.perf_counter()
    result = await open_loop(host, port, requests, rate)
    wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    after = (cpu_seconds(server_pid), tree_cpu(stack_pid), usage.ru_utime + usage.ru_stime, counter.count)
    process = after[0] - before[0]
    stack = after[1] - before[1]
    if server_pid not in descendants(stack_pid):
        stack += process  # the baseline server is not under fluxpipe up
    return Row(
        label, result, wall, process, stack, after[2] - before[2], after[3] - before[3], os.getloadavg()
    )


async def drain(nc: nats.NATS, stream: str, limit: float) -> float:
    """Wait until every durable consumer of the stream has nothing pending (the workers have
    caught up), at most ``limit`` seconds; the seconds it took."""
    js = nc.jetstream()
    started = time.perf_counter()
    while time.perf_counter() - started < limit:
        consumers = await js.consumers_info(stream)
        if all(not c.num_pending and not c.num_ack_pending for c in consumers if c.config.durable_name):
            break
        await asyncio.sleep(0.5)
    return time.perf_counter() - started


def say(rows: list[str], line: str) -> None:
    """Keep a row for the summary, and show it at once (on stderr) in case a later stage fails."""
    rows.append(line)
    print(line, file=sys.stderr, flush=True)


def requests_for(host: str, path: str, tokens: list[str | None], count: int, offset: int) -> list[bytes]:
    return [
        post(
            host,
            path,
            json.dumps({"prompt": f"bench submit {offset + i}", "seed": offset + i}).encode(),
            tokens[i % len(tokens)],
        )
        for i in range(count)
    ]


async def run_stack(
    label: str, data_dir: Path, env: dict[str, str], args: argparse.Namespace, rows: list[str]
) -> None:
    stack, gateway, nats_url, _ = start_stack(data_dir, env)
    try:
        host, port = gateway.removeprefix("http://").split(":")
        settings = Settings(FLUXPIPE_JWT_SECRET=(data_dir / "jwt-secret").read_text().strip())
        tokens: list[str | None] = [issue_token(settings, f"bench-{u}") for u in range(args.users)]
        users = json.loads((data_dir / USERS_FILE).read_text())
        nc = await nats.connect(nats_url, user=OPERATOR, password=users[OPERATOR])
        counter = StoredCounter()
        await nc.subscribe("flux.task.*.stored", cb=counter.on_stored)
        count = int(args.rate * args.seconds)
        gateway_pid = find_gateway(stack.pid)

        await open_loop(host, int(port), requests_for(gateway, PATH, tokens, 100, 10**6), 50)  # warm-up
        await drain(nc, "FLUX", args.drain)
        row = await measured(
            f"gateway ({label})",
            host,
            int(port),
            requests_for(gateway, PATH, tokens, count, 0),
            args.rate,
            gateway_pid,
            stack.pid,
            counter,
        )
        say(rows, row.line())
        say(rows, f"  {'':<34} workers caught up {await drain(nc, 'FLUX', args.drain):.0f} s later")

        base_env = {**env, "NATS_URL": nats_url, "NATS_USER": "gateway", "NATS_PASSWORD": users["gateway"]}
        baseline, base_port = start_baseline(base_env)
        try:
            base = f"127.0.0.1:{base_port}"
            nobody: list[str | None] = [None]
            await open_loop("127.0.0.1", base_port, requests_for(base, "/publish", nobody, 100, 10**6), 50)
            await drain(nc, "FLUX", args.drain)
            row = await measured(
                f"baseline: publish only ({label})",
                "127.0.0.1",
                base_port,
                requests_for(base, "/publish", nobody, count, 2 * 10**6),
                args.rate,
                baseline.pid,
                stack.pid,
                counter,
            )
            say(rows, row.line())
            say(rows, f"  {'':<34} workers caught up {await drain(nc, 'FLUX', args.drain):.0f} s later")
        finally:
            baseline.send_signal(signal.SIGTERM)
            baseline.wait(30)
        await nc.close()
    finally:
        stack.send_signal(signal.SIGINT)
        stack.wait(60)


def main(args: argparse.Namespace) -> None:
    env = provider_env(0.0, 0.0)
    env["FLUXPIPE_SIM_BENCHMARK"] = "true"
    if args.max_per_user:
        env["FLUXPIPE_MAX_TASKS_PER_USER"] = str(args.max_per_user)
    rows: list[str] = []
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for sync in args.sync:
            label = "fsync always" if sync == "always" else "NATS default sync"
            asyncio.run(run_stack(label, Path(tmp) / sync, {**env, "FLUXPIPE_NATS_SYNC": sync}, args, rows))
    print(
        f"POST {PATH} at {args.rate:g}/s for {args.seconds:g} s (open loop, latency from the scheduled "
        f"send), {args.users} users; {os.cpu_count()} cores, load average before "
        f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=25.0, help="length of each measured run")
    parser.add_argument("--users", type=int, default=200, help="users the load is spread over")
    parser.add_argument("--max-per-user", type=int, default=0, help="FLUXPIPE_MAX_TASKS_PER_USER (0: off)")
    parser.add_argument(
        "--sync", nargs="+", default=["always", "default"], choices=["always", "default"], help="NATS sync"
    )
    parser.add_argument("--drain", type=float, default=60.0, help="most seconds to wait for the workers")
    parser.add_argument("--serve-baseline", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    if parsed.serve_baseline:
        serve_baseline(parsed.serve_baseline)
    else:
        main(parsed)
