"""JetStream plumbing on a real server: idempotent setup, de-duplication, ack policy, dead letters."""

from __future__ import annotations

import asyncio

from nats.js.errors import NotFoundError

from schemas.events import TaskRequested, TaskRequestedData, TaskStatusChanged, TaskStatusChangedData
from services.common.bus import PermanentError
from services.common.consumer import Consumer


def requested(task_id: str = "t1") -> TaskRequested:
    return TaskRequested(
        task_id=task_id,
        user_id="alice",
        data=TaskRequestedData(model="fal-ai/flux-1/dev", task_type="text_to_image", prompt="p"),
    )


async def wait_for(predicate, timeout: float = 15.0) -> None:
    """Poll ``predicate`` until true; fails the test if it never becomes true."""
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.05)


async def test_stream_setup_is_idempotent(bus):
    first = await bus.ensure_stream()
    second = await bus.ensure_stream()
    assert first.config.subjects == second.config.subjects == [f"{bus.prefix}.>"]


async def test_republishing_an_event_is_deduplicated_by_msg_id(bus):
    event = requested()
    ack1 = await bus.publish(event)
    ack2 = await bus.publish(event)
    assert not ack1.duplicate and ack2.duplicate
    assert [e for _, e in await bus.task_story("t1")] == [event]


async def test_task_story_is_in_stream_order_and_last_event_finds_the_latest(bus):
    await bus.publish(requested())
    for seq, status in enumerate(("IN_QUEUE", "IN_PROGRESS"), start=1):
        await bus.publish(
            TaskStatusChanged(
                task_id="t1", user_id="alice", data=TaskStatusChangedData(status=status, seq=seq)
            )
        )
    await bus.publish(requested("t2"))
    story = await bus.task_story("t1")
    assert [e.type for _, e in story] == ["task.requested", "task.status_changed", "task.status_changed"]
    assert [s for s, _ in story] == sorted(s for s, _ in story)
    last = await bus.last_event("t1", "status")
    assert isinstance(last, TaskStatusChanged) and last.data.status == "IN_PROGRESS"
    assert await bus.last_event("t1", "completed") is None


async def test_failing_handler_is_redelivered_then_acked(bus):
    consumer = Consumer(durable="flaky", token="requested", backoff=(0.1,), max_deliver=5)
    attempts: list[int] = []

    async def handler(event, msg):
        attempts.append(msg.metadata.num_delivered)
        if len(attempts) < 3:
            raise RuntimeError("transient")

    stop = asyncio.Event()
    runner = asyncio.create_task(consumer.serve(bus, handler, stop))
    await bus.publish(requested())

    async def acked():
        try:
            info = await bus.js.consumer_info(bus.stream, "flaky")
        except NotFoundError:
            return False
        return len(attempts) >= 3 and info.num_ack_pending == 0 and info.num_pending == 0

    await wait_for(acked)
    stop.set()
    await runner
    assert attempts == [1, 2, 3]


async def test_undecodable_and_permanently_failing_messages_are_dead_lettered_with_reason(bus):
    consumer = Consumer(durable="strict", token="requested")

    async def handler(event, msg):
        raise PermanentError("model is retired")

    stop = asyncio.Event()
    runner = asyncio.create_task(consumer.serve(bus, handler, stop))
    await bus.js.publish(f"{bus.prefix}.task.bad.requested", b"{not json", stream=bus.stream)
    await bus.publish(requested("t9"))

    dead: list = []

    async def two_dead_letters():
        dead[:] = [m async for m in bus.iter_raw(bus.dlq_subject("strict"))]
        return len(dead) == 2

    await wait_for(two_dead_letters)
    stop.set()
    await runner
    reasons = []
    for seq, _, _ in dead:
        raw = await bus.js.get_msg(bus.stream, seq=seq)
        reasons.append(raw.headers["Fluxpipe-Reason"])
    assert reasons[0].startswith("undecodable event")
    assert reasons[1] == "model is retired"
    info = await bus.js.consumer_info(bus.stream, "strict")
    assert info.num_ack_pending == 0 and info.num_redelivered == 0


async def test_following_a_story_prints_the_past_then_live_events_and_stops_when_it_ends(bus):
    from tests.test_projector import story as full_story

    events = full_story()
    await bus.publish(events[0])
    seen: list[str] = []

    async def follow() -> None:
        async for _, event in bus.follow_story("task1"):
            seen.append(event.type)

    follower = asyncio.create_task(follow())
    await wait_for(lambda: asyncio.sleep(0, result=seen == ["task.requested"]))
    for event in events[1:]:
        await bus.publish(event)
    await asyncio.wait_for(follower, 10)  # ends by itself after images_stored
    assert seen == [e.type for e in events]


async def test_a_task_ends_once_whichever_terminal_event_comes_first(bus):
    from schemas.events import ProviderImage, TaskCompleted, TaskCompletedData, TaskFailed, TaskFailedData

    failed = TaskFailed(task_id="t9", user_id="u", data=TaskFailedData(stage="timeout", error="late"))
    completed = TaskCompleted(
        task_id="t9", user_id="u", data=TaskCompletedData(request_id="r", images=(ProviderImage(url="u"),))
    )
    assert failed.msg_id == completed.msg_id == "t9.end"
    await bus.publish(failed)
    ack = await bus.publish(completed)
    assert ack.duplicate
    assert [e.type for _, e in await bus.task_story("t9")] == ["task.failed"]


async def test_a_message_that_never_lets_its_handler_finish_is_dead_lettered_before_the_next_try(bus):
    """As if it crashed its worker every time: each delivery ends with the process, not a failure."""
    calls: list[int] = []

    async def hangs(event, msg) -> None:
        calls.append(msg.metadata.num_delivered)
        await asyncio.Event().wait()

    await bus.publish(requested("t7"))
    for _ in range(4):
        stop = asyncio.Event()
        consumer = Consumer(durable="crashy", token="requested", max_deliver=1, grace=0)
        runner = asyncio.create_task(consumer.serve(bus, hangs, stop))
        await asyncio.sleep(0.5)
        stop.set()
        await runner
    assert calls == [1, 2, 3]  # the 4th delivery (more than 3 x max_deliver) never reached it
    parked = await bus.js.get_last_msg(bus.stream, bus.dlq_subject("crashy"))
    assert parked.headers and "delivered 4 times without finishing" in parked.headers["Fluxpipe-Reason"]


async def test_ending_a_dead_lettered_task_is_retried_until_it_works(bus):
    attempts: list[str] = []

    async def end_task(bus_, event, reason) -> None:
        attempts.append(reason)
        if len(attempts) == 1:
            raise ConnectionError("a blip")

    async def fails(event, msg) -> None:
        raise PermanentError("cannot be handled")

    await bus.publish(requested("t8"))
    stop = asyncio.Event()
    consumer = Consumer(durable="hooked", token="requested", backoff=(0.1,), on_dead_letter=end_task)
    runner = asyncio.create_task(consumer.serve(bus, fails, stop))

    async def settled() -> bool:
        try:
            info = await bus.js.consumer_info(bus.stream, "hooked")
        except NotFoundError:
            return False
        return len(attempts) == 2 and info.num_ack_pending == 0 and info.num_pending == 0

    await wait_for(settled)
    stop.set()
    await runner
    dlq = [m async for m in bus.iter_raw(bus.dlq_subject("hooked"))]
    assert len(dlq) == 1  # parked once, though handled twice
