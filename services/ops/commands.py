"""The operators' ``fluxpipe`` commands: ``replay``, ``dlq list|show|redrive``, ``stuck``.

Registered on the main app by ``services/cli.py``. Like ``status``, they talk to a running
stack (found through ``--data-dir``, or ``NATS_URL``/``DATABASE_URL``), never guess a server,
and report a failure as one line with exit code 2.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

if TYPE_CHECKING:
    from services.common.bus import Bus
    from services.ops.dlq import Redriven

T = TypeVar("T")

DataDir = Annotated[
    Path, typer.Option("--data-dir", envvar="FLUXPIPE_DATA_DIR", help="Where the embedded servers keep data")
]
DEFAULT_DATA_DIR = Path(".data")
AsJson = Annotated[bool, typer.Option("--json", help="JSON for machines")]

dlq_app = typer.Typer(no_args_is_help=True, help="Dead letters: list, show, re-drive.")


def _with_bus(data_dir: Path, work: Callable[[Bus], Awaitable[T]]) -> T:
    """Run ``work`` with a read-only connection to the running stack's NATS."""
    from services.cli import _connect, _run_tool, stack_settings

    settings = stack_settings(data_dir)

    async def run() -> T:
        bus = await _connect(settings)
        try:
            return await work(bus)
        finally:
            await bus.close()

    return _run_tool(run())


def replay(
    model: Annotated[
        list[str] | None, typer.Option("--model", help="Read model to rebuild (repeatable); default: all")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Swap even if live rows have no counterpart in the rebuild")
    ] = False,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Rebuild the read models from the start of the stream and swap them in while queries keep working."""
    from services.cli import stack_settings
    from services.projector.replay import replay as rebuild

    settings = stack_settings(data_dir)
    _with_bus(
        data_dir,
        lambda bus: rebuild(
            settings, bus, model or None, say=lambda line: typer.echo(line, err=True), force=force
        ),
    )


@dlq_app.command("list")
def dlq_list(
    consumer: Annotated[str | None, typer.Option(help="Only this consumer's letters")] = None,
    task: Annotated[str | None, typer.Option(help="Only this task's letters")] = None,
    reason: Annotated[str | None, typer.Option(help="Only letters whose reason matches this glob")] = None,
    pending: Annotated[bool, typer.Option("--pending", help="Only letters not re-driven yet")] = False,
    as_json: AsJson = False,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Dead letters: seq, consumer, when, task, event, whether re-driven, reason."""
    from services.ops.dlq import Filter, letters, render

    found = _with_bus(data_dir, lambda bus: letters(bus, Filter(consumer, task, reason, pending)))
    if as_json:
        for item in found:
            typer.echo(json.dumps(item.summary()))
    else:
        typer.echo(render(found))


@dlq_app.command("show")
def dlq_show(
    seq: Annotated[int, typer.Argument(help="The letter's stream seq")], data_dir: DataDir = DEFAULT_DATA_DIR
) -> None:
    """One dead letter in full: where it came from, why, and the event it carries."""
    from services.ops.dlq import letter

    found = _with_bus(data_dir, lambda bus: letter(bus, seq))
    if found is None:
        typer.echo(f"fluxpipe: no dead letter at stream seq {seq}", err=True)
        raise typer.Exit(1)
    out = found.summary()
    try:
        out["event"] = json.loads(found.data)
    except ValueError:
        out["event"] = found.data.decode(errors="replace")
    typer.echo(json.dumps(out, indent=2))


@dlq_app.command("redrive")
def dlq_redrive(
    seqs: Annotated[list[int] | None, typer.Argument(help="Letters' stream seqs")] = None,
    all_matching: Annotated[bool, typer.Option("--all", help="Every letter matching the filters")] = False,
    consumer: Annotated[str | None, typer.Option(help="Filter: this consumer's letters")] = None,
    task: Annotated[str | None, typer.Option(help="Filter: this task's letters")] = None,
    reason: Annotated[str | None, typer.Option(help="Filter: reason matches this glob")] = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Put dead letters back to the consumer that parked them, each at most once."""
    from services.ops.dlq import Filter, letters, redrive

    if not seqs and not all_matching:
        raise typer.BadParameter("name letters by seq, or pass --all (with filters) to re-drive every match")

    async def work(bus: Bus) -> list[Redriven]:
        chosen = await letters(bus, Filter(consumer, task, reason, pending_only=all_matching))
        if seqs:
            missing = set(seqs) - {x.seq for x in chosen}
            if missing:
                raise ValueError(
                    f"no dead letter matching the filters at seq {', '.join(map(str, sorted(missing)))}"
                )
            chosen = [x for x in chosen if x.seq in seqs]
        return [await redrive(bus, x) for x in chosen]

    done = _with_bus(data_dir, work)
    if not done:
        typer.echo("no dead letter to re-drive")
    for item in done:
        detail = f"  {item.detail}" if item.detail else ""
        typer.echo(f"{item.letter:>8}  {item.consumer:<10} {item.outcome}{detail}")
    if any(item.outcome == "refused" for item in done):
        raise typer.Exit(1)


def stuck(
    older_than: Annotated[
        float | None, typer.Option(help="Seconds since creation; default FLUXPIPE_TASK_TIMEOUT")
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many tasks")] = 100,
    as_json: AsJson = False,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Tasks not finished past their timeout, with where each one is stuck."""
    from services.cli import stack_settings
    from services.ops.stuck import render, stuck_tasks

    settings = stack_settings(data_dir)
    age = older_than if older_than is not None else settings.task_timeout_seconds
    found = _with_bus(data_dir, lambda bus: stuck_tasks(settings, bus, age, limit))
    if as_json:
        typer.echo(json.dumps([t.summary() for t in found], indent=2))
    else:
        typer.echo(render(found, age))
