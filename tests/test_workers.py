"""Workers under crashes and redelivery, on real NATS and the fal simulator over HTTP.

No event is lost or doubled: a request handed over by a dying submitter is not submitted to
fal twice, the server caps how many tasks are at fal at once, a poller
that dies mid-follow is resumed by another without repeating a status event, a task stuck
at fal times out and is cancelled there, and bytes that are not an image never get stored.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from nats.js.errors import NotFoundError

from schemas.events import (
    FluxEvent,
    ProviderImage,
    StorageFailed,
    TaskCompleted,
    TaskCompletedData,
    TaskFailed,
    TaskFailedData,
    TaskRequested,
    TaskRequestedData,
    TaskStatusChanged,
    TaskSubmitted,
    encode_event,
)
from services.common.bus import Bus
from services.common.consumer import Consumer
from services.common.fal import FalClient
from services.common.settings import Settings
from services.common.storage import make_storage
from services.poller.main import on_submitted
from services.submitter.main import consumer as submitter_consumer
from services.submitter.main import on_requested, submitted_event
from services.uploader.main import on_completed
from tests.simulator_server import TEST_API_KEY, running_simulator
from tests.test_bus import wait_for


class CountingFal(FalClient):
    """The real client, counting the jobs it submits."""

    submits = 0

    async def submit(self, *args: Any, **kwargs: Any) -> Any:
        self.submits += 1
        return await super().submit(*args, **kwargs)


def requested(task_id: str, prompt: str = "a quiet harbour") -> TaskRequested:
    return TaskRequested(
        task_id=task_id,
        user_id="alice",
        data=TaskRequestedData(
            model="fal-ai/flux-1/schnell", task_type="text_to_image", prompt=prompt, seed=3
        ),
    )


async def types_of(bus: Bus, task_id: str) -> list[str]:
    return [event.type for _, event in await bus.task_story(task_id)]


async def submit_directly(bus: Bus, fal: FalClient, task_id: str) -> TaskSubmitted:
    request = requested(task_id)
    await bus.publish(request)
    handle = await fal.submit("fal-ai/flux-1/schnell", {"prompt": "a quiet harbour", "seed": 3})
    submitted = submitted_event(request, handle)
    await bus.publish(submitted)
    return submitted


async def has_event(bus: Bus, task_id: str, token: str) -> None:
    """Wait until the task's story holds an event of this kind."""

    async def present() -> bool:
        return await bus.last_event(task_id, token) is not None

    await wait_for(present)


async def submitter_holds(bus: Bus, in_hand: int, waiting: int) -> None:
    """Wait until the server shows the submitter holding ``in_hand`` tasks with ``waiting`` queued."""

    async def shows() -> bool:
        return await pending(bus, "submitter") == (in_hand, waiting)

    await wait_for(shows)


async def pending(bus: Bus, durable: str) -> tuple[int, int] | None:
    """(held unacked, waiting) for a consumer, or None before it exists."""
    try:
        info = await bus.js.consumer_info(bus.stream, durable)
    except NotFoundError:
        return None
    return info.num_ack_pending, info.num_pending


def ended(task_id: str) -> TaskFailed:
    """What the poller would publish when the task ends at fal."""
    return TaskFailed(task_id=task_id, user_id="alice", data=TaskFailedData(stage="result", error="done"))


async def serve_submitter(
    bus: Bus,
    fal: FalClient,
    settings: Settings,
    stop: asyncio.Event,
    deliveries: list[int] | None = None,
    consumer: Consumer | None = None,
) -> None:
    consumer = consumer or submitter_consumer(settings, fal)

    async def handle(event: FluxEvent, msg: Any) -> None:
        assert isinstance(event, TaskRequested)
        if deliveries is not None:
            deliveries.append(msg.metadata.num_delivered)
        await on_requested(event, msg, bus=bus, fal=fal, settings=settings, max_deliver=consumer.max_deliver)

    await consumer.serve(bus, handle, stop)


async def test_a_submitter_that_dies_holding_a_task_hands_it_over_without_submitting_again(
    bus, settings, fast
):
    fal = CountingFal(fast.public_url, TEST_API_KEY)
    await bus.publish(requested("t1"))

    first_stop = asyncio.Event()
    first = submitter_consumer(settings, fal)
    first_run = asyncio.create_task(serve_submitter(bus, fal, settings, first_stop, consumer=first))

    await has_event(bus, "t1", "submitted")
    first_stop.set()
    await first_run

    second_stop = asyncio.Event()
    deliveries: list[int] = []
    second_run = asyncio.create_task(serve_submitter(bus, fal, settings, second_stop, deliveries))

    async def held_again() -> bool:
        return deliveries == [2] and await pending(bus, "submitter") == (1, 0)

    await wait_for(held_again)
    await bus.publish(ended("t1"))

    await submitter_holds(bus, 0, 0)
    second_stop.set()
    await second_run
    await fal.aclose()
    assert fal.submits == 1
    assert await types_of(bus, "t1") == ["task.requested", "task.submitted", "task.failed"]


async def test_a_repeated_request_for_a_task_is_never_submitted_again(bus, settings, fast):
    fal = CountingFal(fast.public_url, TEST_API_KEY)
    first = requested("t5")
    await bus.publish(first)
    await bus.js.publish(  # the same job again, past the server's de-duplication
        first.subject(bus.prefix), encode_event(first), stream=bus.stream, headers={"Nats-Msg-Id": "other"}
    )
    stop = asyncio.Event()
    runner = asyncio.create_task(serve_submitter(bus, fal, settings, stop))
    await has_event(bus, "t5", "submitted")
    await bus.publish(ended("t5"))

    await submitter_holds(bus, 0, 0)
    stop.set()
    await runner
    await fal.aclose()
    assert fal.submits == 1
    assert await types_of(bus, "t5") == ["task.requested", "task.requested", "task.submitted", "task.failed"]


class BrokenFal(FalClient):
    """A client whose submit fails with something no retry will fix (a bug, say)."""

    async def submit(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")


async def test_a_task_the_submitter_keeps_failing_on_is_dead_lettered_and_ends_failed(bus, settings, fast):
    fal = BrokenFal(fast.public_url, TEST_API_KEY)
    await bus.publish(requested("t6"))
    consumer = submitter_consumer(settings, fal)
    consumer.max_deliver, consumer.backoff = 2, (0.05,)
    stop = asyncio.Event()
    runner = asyncio.create_task(serve_submitter(bus, fal, settings, stop, consumer=consumer))
    await has_event(bus, "t6", "failed")
    stop.set()
    await runner
    await fal.aclose()
    failure = await bus.last_event("t6", "failed")
    assert isinstance(failure, TaskFailed) and failure.data.stage == "submit"
    assert "could not process this task" in failure.data.error
    parked = await bus.js.get_last_msg(bus.stream, bus.dlq_subject("submitter"))
    assert parked.headers and "a bug" in parked.headers["Fluxpipe-Reason"]


async def test_no_more_than_max_concurrent_tasks_are_at_fal_at_once(bus, settings, parked):
    settings.max_concurrent_tasks = 2
    fal = CountingFal(parked.public_url, TEST_API_KEY)
    for task_id in ("a", "b", "c"):
        await bus.publish(requested(task_id))
    stop = asyncio.Event()
    runner = asyncio.create_task(serve_submitter(bus, fal, settings, stop))

    await submitter_holds(bus, 2, 1)
    assert fal.submits == 2
    assert await bus.last_event("c", "submitted") is None

    await bus.publish(ended("a"))

    await has_event(bus, "c", "submitted")
    assert fal.submits == 3
    await submitter_holds(bus, 2, 0)
    stop.set()
    await runner
    await fal.aclose()


async def test_a_task_whose_follow_up_is_lost_is_failed_and_its_slot_released(bus, settings, parked):
    settings.max_concurrent_tasks = 1
    settings.task_timeout_seconds, settings.stuck_task_grace_seconds = 0.3, 0.2
    fal = CountingFal(parked.public_url, TEST_API_KEY)
    for task_id in ("lost", "next"):
        await bus.publish(requested(task_id))
    stop = asyncio.Event()
    runner = asyncio.create_task(serve_submitter(bus, fal, settings, stop))  # and no poller at all

    await has_event(bus, "next", "submitted")
    stop.set()
    await runner
    failure = await bus.last_event("lost", "failed")
    assert isinstance(failure, TaskFailed)
    assert failure.data.stage == "timeout" and "no outcome 0.5s after submission" in failure.data.error
    submitted = await bus.last_event("lost", "submitted")
    assert isinstance(submitted, TaskSubmitted)
    status = await fal.status(submitted.data.status_url)
    assert status.status == "COMPLETED" and status.error_type == "request_cancelled"
    await fal.aclose()
    assert await types_of(bus, "lost") == ["task.requested", "task.submitted", "task.failed"]


async def test_a_poller_that_dies_mid_follow_is_resumed_without_repeating_events(bus, settings):
    settings.poll_interval_min, settings.poll_interval_max = 0.05, 0.2
    with running_simulator(queue_seconds=0.3, run_seconds=1.5) as sim:
        fal = FalClient(sim.public_url, TEST_API_KEY)
        await submit_directly(bus, fal, "t2")

        async def follow(event: FluxEvent, msg: Any) -> None:
            assert isinstance(event, TaskSubmitted)
            await on_submitted(event, msg, bus=bus, fal=fal, settings=settings)

        first_stop = asyncio.Event()
        first = Consumer(durable="poller", token="submitted")
        first_run = asyncio.create_task(first.serve(bus, follow, first_stop))

        await has_event(bus, "t2", "status")
        first_stop.set()
        await first_run
        assert "task.completed" not in await types_of(bus, "t2")

        second_stop = asyncio.Event()
        second = Consumer(durable="poller", token="submitted")
        second_run = asyncio.create_task(second.serve(bus, follow, second_stop))

        await has_event(bus, "t2", "completed")
        second_stop.set()
        await second_run
        await fal.aclose()

    story = [event for _, event in await bus.task_story("t2")]
    changes = [e for e in story if isinstance(e, TaskStatusChanged)]
    assert [e.data.seq for e in changes] == list(range(1, len(changes) + 1))
    assert all(a.data.status != b.data.status for a, b in zip(changes, changes[1:], strict=False))
    assert changes[-1].data.status == "IN_PROGRESS"
    assert [e.type for e in story].count("task.completed") == 1
    assert story[-1].type == "task.completed"


async def test_a_task_stuck_at_fal_times_out_and_is_cancelled_there(bus, settings, parked):
    settings.task_timeout_seconds, settings.poll_interval_min, settings.poll_interval_max = 0.5, 0.05, 0.1
    fal = FalClient(parked.public_url, TEST_API_KEY)
    submitted = await submit_directly(bus, fal, "t3")

    async def follow(event: FluxEvent, msg: Any) -> None:
        assert isinstance(event, TaskSubmitted)
        await on_submitted(event, msg, bus=bus, fal=fal, settings=settings)

    stop = asyncio.Event()
    runner = asyncio.create_task(Consumer(durable="poller", token="submitted").serve(bus, follow, stop))

    await has_event(bus, "t3", "failed")
    stop.set()
    await runner
    failure = await bus.last_event("t3", "failed")
    assert isinstance(failure, TaskFailed)
    assert failure.data.stage == "timeout" and "timed out after 0.5s" in failure.data.error
    status = await fal.status(submitted.data.status_url)
    assert status.status == "COMPLETED" and status.error_type == "request_cancelled"
    await fal.aclose()


async def test_bytes_that_are_not_an_image_end_in_storage_failed_and_store_nothing(bus, settings, fast):
    not_an_image = f"{fast.public_url}/.well-known/jwks.json"
    completed = TaskCompleted(
        task_id="t4",
        user_id="alice",
        data=TaskCompletedData(request_id="r", images=(ProviderImage(url=not_an_image),)),
    )
    await bus.publish(requested("t4"))
    await bus.publish(completed)

    async def store(event: FluxEvent, msg: Any) -> None:
        assert isinstance(event, TaskCompleted)
        await on_completed(
            event, msg, bus=bus, storage=make_storage(settings), http=http, settings=settings, max_deliver=3
        )

    async with httpx.AsyncClient() as http:
        stop = asyncio.Event()
        runner = asyncio.create_task(Consumer(durable="uploader", token="completed").serve(bus, store, stop))

        await has_event(bus, "t4", "storage_failed")
        stop.set()
        await runner
    failure = await bus.last_event("t4", "storage_failed")
    assert isinstance(failure, StorageFailed) and "not a decodable image" in failure.data.error
    assert not settings.storage_dir.exists() or not any(settings.storage_dir.iterdir())
