"""``fluxpipe``: run the stack or one service, migrate, issue tokens, read a task's events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Coroutine
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import httpx
import typer

from services.common.settings import Settings
from services.storage_cli import app as storage_app

if TYPE_CHECKING:
    from services.common.bus import Bus
    from services.common.supervisor import Supervisor

T = TypeVar("T")

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
app.add_typer(storage_app, name="storage")

DataDir = Annotated[
    Path, typer.Option("--data-dir", envvar="FLUXPIPE_DATA_DIR", help="Where the embedded servers keep data")
]
DEFAULT_DATA_DIR = Path(".data")
RUNTIME_FILE = "runtime.json"
SECRET_FILE = "jwt-secret"
IDEMPOTENCY_SECRET_FILE = "idempotency-secret"
CONFIG_KEY_FILE = "config-key"


class Service(StrEnum):
    gateway = "gateway"
    submitter = "submitter"
    poller = "poller"
    uploader = "uploader"
    projector = "projector"
    simulator = "simulator"
    ledger = "ledger"


WORKERS = (Service.projector, Service.submitter, Service.poller, Service.uploader, Service.ledger)
DEV_TOKEN_TTL = timedelta(days=365)
WORKER_NICE = 5


def load_settings(data_dir: Path = DEFAULT_DATA_DIR) -> Settings:
    """Settings from the environment; what it leaves unset comes from a running ``fluxpipe up``
    in ``data_dir`` (its URLs) and from the data folder's JWT secret."""
    extra: dict[str, Any] = {k: v for k, v in running_stack(data_dir).items() if k not in os.environ}
    secret = data_dir / SECRET_FILE
    if "FLUXPIPE_JWT_SECRET" not in os.environ and secret.exists():
        extra["FLUXPIPE_JWT_SECRET"] = secret.read_text().strip()
    extra.update(operator_nats_env(data_dir))
    return Settings(**extra)


def operator_nats_env(data_dir: Path) -> dict[str, str]:
    """The operators' own NATS user of the stack in ``data_dir``, unless NATS_USER is set."""
    from services.common.nats_auth import OPERATOR, USERS_FILE, service_env

    users_file = data_dir / USERS_FILE
    if "NATS_USER" in os.environ or not users_file.exists():
        return {}
    return service_env(json.loads(users_file.read_text()), OPERATOR)


def running_stack(data_dir: Path) -> dict[str, str]:
    """The URLs of the ``fluxpipe up`` running on ``data_dir``; empty if none is (a file left by
    a killed one names a process that is gone)."""
    try:
        info = json.loads((data_dir / RUNTIME_FILE).read_text())
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {k: info[k] for k in ("NATS_URL", "DATABASE_URL") if k in info}


def stack_settings(data_dir: Path) -> Settings:
    """Settings of a command that talks to a running stack: it never guesses a server."""
    if "NATS_URL" not in os.environ and not running_stack(data_dir):
        _fail(
            f"no running fluxpipe up found in {data_dir}/: run this where `fluxpipe up` keeps its data, "
            "pass --data-dir, or set NATS_URL (and DATABASE_URL)"
        )
    return load_settings(data_dir)


def _fail(message: str) -> NoReturn:
    typer.echo(f"fluxpipe: {message}", err=True)
    raise typer.Exit(2)


def _run_tool(work: Coroutine[Any, Any, T]) -> T:
    """Run an operator command's work: what goes wrong is one line and exit code 2."""
    try:
        return asyncio.run(work)
    except (typer.Exit, KeyboardInterrupt):
        raise
    except Exception as exc:
        detail = str(exc) or exc.__class__.__name__
        _fail(f"{detail} ({exc.__class__.__name__})" if str(exc) else detail)


async def _connect(settings: Settings) -> Bus:
    from services.common.bus import Bus, NatsCredentialsRejected

    try:
        return await Bus.connect(settings, "cli", ensure=False, reconnect=False)
    except NatsCredentialsRejected as exc:
        _fail(str(exc))
    except Exception as exc:
        _fail(f"cannot reach NATS at {settings.nats_url} ({exc.__class__.__name__}); is the stack running?")


@app.command()
def run(
    service: Service,
    host: Annotated[str, typer.Option(help="Listen address (gateway, simulator)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Listen port (gateway, simulator)")] = 8080,
) -> None:
    """Run one service in the foreground until SIGINT/SIGTERM."""
    settings = Settings()
    if service is Service.simulator:
        from services.simulator.app import main as simulate
        from services.simulator.settings import SimulatorEnvironment

        environment = SimulatorEnvironment()
        simulate(
            host, port, environment.settings(settings.fal_key.get_secret_value(), f"http://{host}:{port}")
        )
        return
    from services.common.runtime import run_until_signalled, setup_logging

    setup_logging(settings, service.value)
    if service is Service.gateway:
        import uvicorn

        from services.gateway.app import create_app

        app = create_app(settings)
        server = uvicorn.Server(uvicorn.Config(app, **gateway_server_options(host, port)))
        app.state.server = server  # its start-up gives up on NATS when told to stop
        server.run()
        return
    import uvloop  # libuv's event loop: less CPU per socket operation than asyncio's own

    from services.common.bus import REACHED_NATS, NatsCredentialsRejected

    module = __import__(f"services.{service.value}.main", fromlist=["main"])
    try:
        uvloop.run(run_until_signalled(lambda stop: module.main(settings, stop), ready=REACHED_NATS))
    except NatsCredentialsRejected as exc:
        _fail(str(exc))


def gateway_server_options(host: str, port: int) -> dict[str, Any]:
    """How uvicorn serves the gateway, chosen for the CPU a request costs (docs/BENCHMARKS.md,
    "Submit latency at a fixed rate"): uvloop's event loop and the httptools parser (both
    dependencies), no access log (a formatted line per request; ``/metrics`` counts requests
    by route and status), and no proxy-header rewriting: nothing in the gateway reads the
    client's address or scheme (its own URLs come from ``FLUXPIPE_PUBLIC_URL``), and uvicorn
    only honoured them from 127.0.0.1 anyway."""
    return {
        "host": host,
        "port": port,
        "log_level": "warning",
        "access_log": False,
        "proxy_headers": False,
        "loop": "uvloop",
        "http": "httptools",
    }


@app.command()
def migrate(data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Apply the Alembic migrations (``alembic upgrade head``)."""
    from services.common.migrate import upgrade

    upgrade(load_settings(data_dir))


@app.command()
def token(
    user: Annotated[str, typer.Option(help="User id (the token's subject)")],
    admin: Annotated[bool, typer.Option("--admin", help="Grant admin rights")] = False,
    ttl: Annotated[
        str, typer.Option(help="How long the token is valid: e.g. 30m, 12h, 7d (default 12h)")
    ] = "12h",
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Print a bearer token the gateway accepts (HS256 JWT signed with the configured secret)."""
    from services.common.auth import issue_token, parse_ttl

    try:
        lifetime = parse_ttl(ttl)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--ttl") from exc

    settings = load_settings(data_dir)
    if not settings.jwt_secret.get_secret_value():
        _fail(
            f"no signing secret: {data_dir / SECRET_FILE} does not exist (run this where `fluxpipe up` "
            "keeps its data, or pass --data-dir) and FLUXPIPE_JWT_SECRET is not set"
        )
    typer.echo(issue_token(settings, user, admin=admin, ttl=lifetime))


def _summary(event: Any) -> str:
    d = event.data
    match event.type:
        case "task.requested":
            return f"{d.model} prompt={(d.prompt or '')[:60]!r}"
        case "task.submitted":
            return f"request_id={d.request_id} queue_position={d.queue_position}"
        case "task.status_changed":
            return d.status + (f" queue_position={d.queue_position}" if d.queue_position is not None else "")
        case "task.completed":
            return f"{len(d.images)} image(s) generation_time={d.generation_time}"
        case "task.failed":
            return f"[{d.stage}] {d.error}"
        case "task.images_stored":
            return " ".join(img.url for img in d.images)
        case "task.storage_failed":
            return d.error
        case _:
            return ""


@app.command()
def events(
    task_id: str,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line")] = False,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Then print new events live until the task's story ends")
    ] = False,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Print a task's event story, read back from JetStream in stream order."""

    def show(seq: int, event: Any) -> None:
        if as_json:
            typer.echo(json.dumps({"seq": seq, **event.model_dump(mode="json")}))
        else:
            typer.echo(
                f"{seq:>8}  {event.occurred_at.isoformat(timespec='milliseconds')}  {event.type:<22} "
                f"{_summary(event)}"
            )

    settings = stack_settings(data_dir)

    async def story() -> int:
        bus = await _connect(settings)
        try:
            if follow:
                if await bus.last_event(task_id, "requested") is None:
                    typer.echo(f"no events for task {task_id} yet; waiting (Ctrl-C to stop)", err=True)
                async for seq, event in bus.follow_story(task_id):
                    show(seq, event)
                return 0
            found = await bus.task_story(task_id)
            for seq, event in found:
                show(seq, event)
            return len(found)
        finally:
            await bus.close()

    with contextlib.suppress(KeyboardInterrupt):
        if _run_tool(story()) == 0 and not follow:
            typer.echo(f"no events for task {task_id}", err=True)
            raise typer.Exit(1)


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object")] = False,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """How the pipeline is doing: the stream, each worker's queue, the projector, dead letters."""
    from services.common.status import pipeline_status, render_status

    report = _run_tool(pipeline_status(stack_settings(data_dir), _connect))
    typer.echo(json.dumps(report, indent=2) if as_json else render_status(report))


@app.command()
def up(
    port: Annotated[int, typer.Option(help="Gateway port")] = 8080,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Run the whole stack: NATS, PostgreSQL, migrations, simulator, gateway and the four workers.

    Uses NATS_URL / DATABASE_URL / FAL_BASE_URL when set, else starts embedded servers and the
    fal simulator. Ctrl-C stops everything it started.
    """
    from services.common.auth import issue_token, load_or_create_secret
    from services.common.config import load_or_create_config_key
    from services.common.embedded import (
        EmbeddedNats,
        EmbeddedPostgres,
        free_port,
        port_is_free,
        remembered_port,
        wait_for_port,
    )
    from services.common.migrate import upgrade
    from services.common.nats_auth import authorization_block, load_or_create_users, service_env
    from services.common.supervisor import KeptServer, Supervisor

    if "FAL_BASE_URL" in os.environ and not os.environ.get("FAL_KEY"):
        raise typer.BadParameter("FAL_KEY is required when FAL_BASE_URL points at a real provider")
    fsync = _fsync_every_write()
    if not port_is_free(port):
        raise typer.BadParameter(f"port {port} is in use; choose another with --port", param_hint="--port")
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    stopping = failed = False

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    # Installed explicitly: a shell's background job inherits SIGINT as ignored. SIGHUP (the
    # terminal closed) stops the stack cleanly too, instead of orphaning it.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    started: list[Any] = []
    env = dict(os.environ)

    def say(line: str) -> None:
        typer.echo(line, err=True)

    children = Supervisor(env, say=say)
    runtime = data_dir / RUNTIME_FILE
    try:
        env.setdefault("FLUXPIPE_JWT_SECRET", load_or_create_secret(data_dir / SECRET_FILE))
        env.setdefault(
            "FLUXPIPE_IDEMPOTENCY_SECRET", load_or_create_secret(data_dir / IDEMPOTENCY_SECRET_FILE)
        )
        nats_users: dict[str, str] = {}
        env.setdefault("FLUXPIPE_CONFIG_KEY", load_or_create_config_key(data_dir / CONFIG_KEY_FILE))
        env.setdefault("FLUXPIPE_STORAGE_DIR", str(data_dir / "storage"))
        env.setdefault("FLUXPIPE_PUBLIC_URL", f"http://127.0.0.1:{port}")
        env["PYTHONUNBUFFERED"] = "1"
        if "NATS_URL" not in os.environ:
            nats_users = load_or_create_users(data_dir)
            base = Settings()
            nats_port = free_port()
            auth = authorization_block(nats_users, base.stream_name, base.subject_prefix)
            nats_server = KeptServer(
                lambda: EmbeddedNats.start(data_dir / "nats", nats_port, sync_always=fsync, auth=auth), say
            )
            started.append(nats_server)
            env["NATS_URL"] = nats_server.server.url
        if "DATABASE_URL" not in os.environ:
            pg = KeptServer(lambda: EmbeddedPostgres.start(data_dir / "pg"), say)
            started.append(pg)
            env["DATABASE_URL"] = pg.server.url
        core: dict[str, Any] = {k: env[k] for k in ("NATS_URL", "DATABASE_URL", "FLUXPIPE_JWT_SECRET")}
        settings = Settings(**core)
        upgrade(settings)

        if "FAL_BASE_URL" not in os.environ:
            sim_dir = data_dir / "simulator"
            sim_port = remembered_port(sim_dir / "port")
            env["FAL_BASE_URL"] = f"http://127.0.0.1:{sim_port}"
            env.setdefault("FAL_KEY", "sim-" + load_or_create_secret(sim_dir / "fal-key"))
            env.setdefault("FLUXPIPE_SIM_DATA_DIR", str(sim_dir))
            env.setdefault("FAL_JWKS_URL", f"{env['FAL_BASE_URL']}/.well-known/jwks.json")
            simulator = children.spawn(Service.simulator, "--port", str(sim_port))
            wait_for_port("127.0.0.1", sim_port, 30, simulator)

        def own_user(service: Service) -> dict[str, str]:
            return service_env(nats_users, service.value) if nats_users else {}

        for worker in WORKERS:  # below the gateway: users' requests first, the backlog waits
            children.spawn(worker, env=own_user(worker), nice=WORKER_NICE)
        children.spawn(Service.gateway, "--port", str(port), env=own_user(Service.gateway))
        gateway = f"http://127.0.0.1:{port}"
        _wait_ready(gateway, children)
        runtime.touch(mode=0o600)
        runtime.write_text(
            json.dumps(
                {
                    "NATS_URL": env["NATS_URL"],
                    "DATABASE_URL": env["DATABASE_URL"],
                    "GATEWAY_URL": gateway,
                    "pid": os.getpid(),
                }
            )
        )
        token = issue_token(settings, "dev", ttl=DEV_TOKEN_TTL)
        typer.echo(
            f"\nfluxpipe is up\n  gateway: {gateway}  (API docs at {gateway}/docs)\n  token:   {token}\n"
            f"           (user 'dev'; a long-lived dev token, valid {DEV_TOKEN_TTL.days} days: "
            "`fluxpipe token --user NAME` for short-lived ones)\n"
            f"  try:     curl -s -X POST {gateway}/api/flux/text-to-image -H 'Authorization: Bearer {token}' "
            "-H 'Content-Type: application/json' -d '{\"prompt\": \"a lighthouse at dawn\"}'\n"
            "Press Ctrl-C to stop.\n"
        )
        while True:
            for server in started:
                server.check()  # a dead NATS or PostgreSQL is started again on its data
            children.check()
            time.sleep(0.5)
    except KeyboardInterrupt:
        stopping = True
        typer.echo("\nstopping fluxpipe…")
    except (RuntimeError, TimeoutError) as exc:
        typer.echo(f"fluxpipe up failed: {exc}; stopping everything it started", err=True)
        failed = True
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        runtime.unlink(missing_ok=True)
        children.stop()
        for server in reversed(started):
            server.stop()
            typer.echo(f"fluxpipe: {server.name} stopped", err=True)
        if stopping:
            typer.echo("fluxpipe stopped")
    if failed:
        raise typer.Exit(1)


def _fsync_every_write() -> bool:
    """``FLUXPIPE_NATS_SYNC``: ``always`` (default) or ``default`` (the server's 2-minute sync)."""
    choice = os.environ.get("FLUXPIPE_NATS_SYNC", "always")
    if choice not in ("always", "default"):
        raise typer.BadParameter(f"FLUXPIPE_NATS_SYNC must be 'always' or 'default', not {choice!r}")
    return choice == "always"


def _wait_ready(gateway: str, children: Supervisor, timeout: float = 90) -> None:
    """Wait for the gateway's readiness; a child dying during start-up is a configuration
    problem, not a crash to restart, so it fails ``up`` at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, code in children.exited():
            raise RuntimeError(f"{name} exited with code {code} during start-up")
        try:
            if httpx.get(f"{gateway}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"gateway not ready at {gateway} after {timeout}s")


from services.ingest import commands as ingest_commands  # noqa: E402

app.command("ingest")(ingest_commands.ingest)
app.command("import-openwebui")(ingest_commands.import_openwebui)
from services.ops import commands as ops  # noqa: E402  (operators' commands, registered here)

app.command()(ops.replay)
app.add_typer(ops.dlq_app, name="dlq")
app.command()(ops.stuck)

if __name__ == "__main__":
    app()
