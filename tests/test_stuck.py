"""``fluxpipe stuck`` names each unfinished task and where it is stuck, from the log."""

from __future__ import annotations

import asyncio
import json

from schemas.events import TaskFailed, TaskFailedData
from services.common.consumer import Consumer
from services.ops.stuck import stuck_tasks
from services.projector.main import project
from tests.test_dlq import cli
from tests.test_replay import caught_up, task_story


async def test_stuck_tasks_say_where_they_are_stuck(bus, engine, settings):
    waiting = task_story("w1", "running")[:1]  # requested, no submitter took it yet
    held = task_story("h1", "running")[:2]  # submitted, a poller holds it
    parked = task_story("p1", "running")[:2]  # submitted, the poller dead-lettered it
    ended = task_story("e1", "running")[:2]  # failed in the log, not yet in the read model
    for event in waiting + held + parked + ended:
        await bus.publish(event)
    await bus.dead_letter(
        "poller", f"{bus.prefix}.task.p1.submitted", 4, b"{}", "gave up after 20 deliveries"
    )
    stop = asyncio.Event()
    projector = asyncio.create_task(project(bus, engine, stop))
    try:
        await caught_up(bus, engine)
    finally:
        stop.set()
        await projector
    await bus.publish(TaskFailed(task_id="e1", user_id="alice", data=TaskFailedData(stage="poll", error="x")))

    await Consumer(durable="submitter", token="requested").ensure(bus)  # created, nothing taken
    poller = Consumer(durable="poller", token="submitted")
    await poller.ensure(bus)
    sub = await bus.js.pull_subscribe_bind(durable="poller", stream=bus.stream)
    taken = await sub.fetch(1)  # h1's submission, held unacked like a poller following it
    assert taken[0].subject.endswith(".h1.submitted")

    found = {t.task_id: t for t in await stuck_tasks(settings, bus, older_than=0)}
    assert set(found) == {"w1", "h1", "p1", "e1"}
    assert found["w1"].status == "PENDING" and found["w1"].last_event == "requested"
    assert "waiting in the submitter's queue" in found["w1"].where
    assert "in the poller's hands" in found["h1"].where and found["h1"].status == "IN_QUEUE"
    assert found["p1"].where.startswith("dead-lettered by poller: gave up after 20 deliveries")
    assert "ended in the log (failed" in found["e1"].where and found["e1"].status == "IN_QUEUE"
    assert await stuck_tasks(settings, bus, older_than=3600) == []

    out = cli(settings, "stuck", "--older-than", "0", "--json")
    assert out.returncode == 0, out.stderr
    assert {t["task_id"] for t in json.loads(out.stdout)} == {"w1", "h1", "p1", "e1"}
