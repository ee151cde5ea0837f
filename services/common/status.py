"""``fluxpipe status``: what an operator on call asks first, read from JetStream and PostgreSQL."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from nats.js.errors import NotFoundError
from sqlalchemy import text

from services.common.bus import Bus
from services.common.db import make_engine
from services.common.settings import Settings

WORKERS = ("submitter", "poller", "uploader", "ledger")


async def pipeline_status(
    settings: Settings, connect: Callable[[Settings], Awaitable[Bus]]
) -> dict[str, Any]:
    """The stream's size, each worker consumer's backlog, the projector's position and the
    dead letters per consumer. Read-only."""
    bus = await connect(settings)
    try:
        info = await bus.js.stream_info(bus.stream, subjects_filter=bus.dlq_subject("*"))
        report: dict[str, Any] = {
            "stream": {
                "name": bus.stream,
                "messages": info.state.messages,
                "bytes": info.state.bytes,
                "last_seq": info.state.last_seq,
            },
            "consumers": {},
            "dead_letters": {
                subject.rsplit(".", 1)[-1]: count for subject, count in (info.state.subjects or {}).items()
            },
        }
        for durable in WORKERS:
            try:
                c = await bus.js.consumer_info(bus.stream, durable)
            except NotFoundError:
                report["consumers"][durable] = None
                continue
            report["consumers"][durable] = {
                "waiting": c.num_pending,
                "in_hand": c.num_ack_pending,
                "redelivered": c.num_redelivered,
                "max_in_hand": c.config.max_ack_pending,
            }
        report["projector"] = await _projector(bus, settings, info.state.last_seq)
    finally:
        await bus.close()
    return report


CHECKPOINT_QUERY = text("select stream_seq from projector_checkpoints where name = 'flux_tasks'")


async def _projector(bus: Bus, settings: Settings, last_seq: int) -> dict[str, Any]:
    engine = make_engine(settings, pool_size=1)
    try:
        async with engine.connect() as conn:
            applied = int((await conn.execute(CHECKPOINT_QUERY)).scalar() or 0)
    except Exception as exc:
        return {"error": f"PostgreSQL unreachable ({exc.__class__.__name__})"}
    finally:
        await engine.dispose()
    try:
        await bus.js.get_msg(bus.stream, seq=applied + 1, subject=bus.events_subject(), next=True)
    except NotFoundError:
        return {"applied_through_seq": applied, "behind_at_most": 0}
    return {"applied_through_seq": applied, "behind_at_most": last_seq - applied}


def render_status(report: dict[str, Any]) -> str:
    s = report["stream"]
    lines = [
        f"stream {s['name']}: {s['messages']} messages, {s['bytes'] / 1e6:.1f} MB, last seq {s['last_seq']}"
    ]
    lines.append(f"{'consumer':<12}{'waiting':>9}{'in hand':>9}{'of max':>8}{'redelivered':>13}")
    for name, c in report["consumers"].items():
        if c is None:
            lines.append(f"{name:<12}{'(not created yet: has it ever started?)':>39}")
        else:
            lines.append(
                f"{name:<12}{c['waiting']:>9}{c['in_hand']:>9}{c['max_in_hand']:>8}{c['redelivered']:>13}"
            )
    p = report["projector"]
    if "error" in p:
        lines.append(f"projector: {p['error']}")
    else:
        lag = "up to date" if not p["behind_at_most"] else f"at most {p['behind_at_most']} message(s) behind"
        lines.append(f"projector: applied through seq {p['applied_through_seq']}, {lag}")
    dead = report["dead_letters"]
    lines.append(
        "dead letters: " + (", ".join(f"{k} {v}" for k, v in sorted(dead.items())) if dead else "none")
    )
    return "\n".join(lines)
