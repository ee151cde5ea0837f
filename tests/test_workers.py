"""Workers under crashes and redelivery, on real NATS and the fal simulator over HTTP.

No event is lost or doubled: a redelivered request is not submitted to fal twice, a poller
that dies mid-follow is resumed by another without repeating a status event, a task stuck
at fal times out and is cancelled there, and bytes that are not an image never get stored.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from schemas.events import (
    FluxEvent,
    ProviderImage,
    StorageFailed,
    TaskCompleted,
    TaskCompletedData,
    TaskFailed,
    TaskRequested,
    TaskRequestedData,
    TaskStatusChanged,
    TaskSubmitted,
    TaskSubmittedData,
)
from services.common.bus import Bus, Consumer
from services.common.fal import FalClient
from services.common.storage import make_storage
from services.poller.main import on_submitted
from services.submitter.main import on_requested
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
    submitted = TaskSubmitted(
        task_id=task_id,
        user_id="alice",
        data=TaskSubmittedData(
            request_id=handle.request_id,
            status_url=handle.status_url,
            response_url=handle.response_url,
            cancel_url=handle.cancel_url,
            queue_position=handle.queue_position,
        ),
    )
    await bus.publish(submitted)
    return submitted


async def test_a_request_redelivered_after_a_crash_is_submitted_to_fal_once(bus, fast):
    fal = CountingFal(fast.public_url, TEST_API_KEY)
    deliveries: list[int] = []

    async def crash_once_after_the_effect(event: FluxEvent, msg: Any) -> None:
        deliveries.append(msg.metadata.num_delivered)
        assert isinstance(event, TaskRequested)
        await on_requested(event, msg, bus=bus, fal=fal, max_deliver=5)
        if len(deliveries) == 1:
            raise RuntimeError("crashed after publishing TaskSubmitted, before the ack")

    stop = asyncio.Event()
    consumer = Consumer(durable="submitter", token="requested", backoff=(0.1,))
    runner = asyncio.create_task(consumer.serve(bus, crash_once_after_the_effect, stop))
    await bus.publish(requested("t1"))

    async def settled() -> bool:
        return (
            deliveries == [1, 2]
            and (await bus.js.consumer_info(bus.stream, "submitter")).num_ack_pending == 0
        )

    await wait_for(settled)
    stop.set()
    await runner
    await fal.aclose()
    assert fal.submits == 1
    assert await types_of(bus, "t1") == ["task.requested", "task.submitted"]


async def test_a_poller_that_dies_mid_follow_is_resumed_without_repeating_events(bus, settings):
    settings.poll_interval_min, settings.poll_interval_max = 0.05, 0.2
    with running_simulator(queue_seconds=0.3, run_seconds=1.5) as sim:
        fal = FalClient(sim.public_url, TEST_API_KEY)
        await submit_directly(bus, fal, "t2")

        async def follow(event: FluxEvent, msg: Any) -> None:
            assert isinstance(event, TaskSubmitted)
            await on_submitted(event, msg, bus=bus, fal=fal, settings=settings)

        first_stop = asyncio.Event()
        first = Consumer(durable="poller", token="submitted", grace=0)
        first_run = asyncio.create_task(first.serve(bus, follow, first_stop))

        async def saw_a_status_change() -> bool:
            return await bus.last_event("t2", "status") is not None

        await wait_for(saw_a_status_change)
        first_stop.set()
        await first_run
        assert "task.completed" not in await types_of(bus, "t2")

        second_stop = asyncio.Event()
        second = Consumer(durable="poller", token="submitted")
        second_run = asyncio.create_task(second.serve(bus, follow, second_stop))

        async def completed() -> bool:
            return await bus.last_event("t2", "completed") is not None

        await wait_for(completed)
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

    async def failed() -> bool:
        return await bus.last_event("t3", "failed") is not None

    await wait_for(failed)
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

        async def storage_failed() -> bool:
            return await bus.last_event("t4", "storage_failed") is not None

        await wait_for(storage_failed)
        stop.set()
        await runner
    failure = await bus.last_event("t4", "storage_failed")
    assert isinstance(failure, StorageFailed) and "not a decodable image" in failure.data.error
    assert not settings.storage_dir.exists() or not any(settings.storage_dir.iterdir())
