"""The ``fluxpipe ingest`` and ``fluxpipe import-openwebui`` commands (registered in services/cli.py)."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

DataDir = Annotated[
    Path, typer.Option("--data-dir", envvar="FLUXPIPE_DATA_DIR", help="Where the embedded servers keep data")
]


def _summary(counts: Counter[str]) -> str:
    return ", ".join(f"{n} {what}" for what, n in sorted(counts.items())) or "nothing"


def ingest(
    path: Annotated[str, typer.Argument(help="A JSON lines file, or - for standard input")] = "-",
    data_dir: DataDir = Path(".data"),
) -> None:
    """Record other generators' items (Midjourney, Jimeng) in the unified history from JSON lines:
    one {source, id, user_id, status?, prompt?, model?, image_url?, cloud_image_url?, created_at}
    per line. Nothing is published unless every line is valid; re-running changes nothing."""
    from services.cli import _connect, _fail, _run_tool, stack_settings
    from services.ingest.lines import BadLine, parse_lines
    from services.ingest.record import record_items

    try:
        if path == "-":
            events = parse_lines(sys.stdin)
        else:
            with Path(path).open(encoding="utf-8") as lines:
                events = parse_lines(lines)
    except (BadLine, OSError, UnicodeDecodeError) as exc:
        _fail(f"{path}: {exc}")
    settings = stack_settings(data_dir)

    async def work() -> Counter[str]:
        bus = await _connect(settings)
        try:
            return await record_items(bus, events)
        finally:
            await bus.close()

    typer.echo(f"ingest: {_summary(_run_tool(work()))}")


def import_openwebui(
    database_url: Annotated[
        str, typer.Option("--database-url", help="Open WebUI's PostgreSQL, e.g. postgresql://u:p@host/db")
    ],
    data_dir: DataDir = Path(".data"),
) -> None:
    """Import an Open WebUI deployment's mj_tasks and dreamwork_tasks rows into the unified
    history, once (rows with an image; re-running changes nothing)."""
    from services.cli import _connect, _run_tool, stack_settings
    from services.common.settings import Settings
    from services.ingest.openwebui import import_openwebui as run_import

    settings = stack_settings(data_dir)

    async def work() -> dict[str, Counter[str]]:
        bus = await _connect(settings)
        try:
            return await run_import(bus, Settings(DATABASE_URL=database_url).asyncpg_dsn)
        finally:
            await bus.close()

    for source, counts in _run_tool(work()).items():
        typer.echo(f"{source}: {_summary(counts)}")
