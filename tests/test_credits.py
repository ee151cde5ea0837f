"""Credits on real NATS and PostgreSQL: held at request time, charged on success, refunded once
on failure (also when the terminal event is redelivered), a job held by a gateway that died is
published by the ledger worker, and replaying the log gives the same balances."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text

from schemas.events import (
    CreditsCharged,
    CreditsHeld,
    CreditsHeldData,
    CreditsRefunded,
    CreditsSettledData,
    ProviderImage,
    TaskCompleted,
    TaskCompletedData,
    TaskFailed,
    TaskFailedData,
    TaskRequested,
    TaskRequestedData,
    decode_event,
    encode_event,
    ledger_token,
)
from services.common import credits
from services.common.bus import Bus
from services.ledger.main import on_event
from services.ledger.main import worker as ledger_worker
from services.projector.main import project
from tests.test_bus import wait_for


def request(user: str = "alice", model: str = "fal-ai/flux-1/dev") -> TaskRequested:
    return TaskRequested(
        task_id=uuid.uuid4().hex,
        user_id=user,
        data=TaskRequestedData(model=model, task_type="text_to_image", prompt="a kite"),
    )


async def ledger_events(bus: Bus, user: str) -> list:
    return [decode_event(d) async for _, _, d in bus.iter_raw(credits.ledger_subject(bus, user))]


async def two_jobs_that_end(bus: Bus, balance: int, cost: int) -> tuple[TaskRequested, TaskRequested]:
    """Alice gets ``balance``; two jobs hold ``cost`` each; the first completes, the second fails."""
    await credits.grant(bus, "alice", balance, "welcome", actor="root")
    ok, bad = request(), request()
    for job in (ok, bad):
        await credits.hold(bus, job, cost, max_open=0)
        await bus.publish(job)
    assert (await credits.read_ledger(bus, "alice")).balance == balance - 2 * cost
    image = ProviderImage(url="http://x/1.jpg")
    await bus.publish(TaskCompleted.caused_by(ok, TaskCompletedData(request_id="r1", images=(image,))))
    await bus.publish(TaskFailed.caused_by(bad, TaskFailedData(stage="submit", error="boom")))
    return ok, bad


@pytest.fixture
async def ledger_running(settings, bus) -> AsyncIterator[None]:
    stop = asyncio.Event()
    runner = asyncio.create_task(ledger_worker.main(settings, stop))
    yield
    stop.set()
    await runner


async def test_cost_is_held_then_charged_on_success_and_refunded_on_failure(bus, ledger_running):
    ok, bad = await two_jobs_that_end(bus, balance=10, cost=3)

    async def settled() -> bool:
        return not (await credits.read_ledger(bus, "alice")).open_tasks

    await wait_for(settled)
    ledger = await credits.read_ledger(bus, "alice")
    assert (ledger.balance, ledger.used) == (7, 3)
    kinds = [(type(e).__name__, e.task_id) for e in await ledger_events(bus, "alice")]
    assert ("CreditsCharged", ok.task_id) in kinds and ("CreditsRefunded", bad.task_id) in kinds


async def test_a_failed_task_is_refunded_exactly_once_when_its_event_is_redelivered(bus):
    await credits.grant(bus, "alice", 5, "welcome", actor="root")
    job = request()
    await credits.hold(bus, job, 5, max_open=0)
    failed = TaskFailed.caused_by(job, TaskFailedData(stage="poll", error="gone"))
    await bus.publish(failed)

    # The first delivery, then redeliveries (a worker that died before its ack), some at once.
    await on_event(failed, None, bus=bus)  # type: ignore[arg-type]
    await asyncio.gather(*(on_event(failed, None, bus=bus) for _ in range(5)))  # type: ignore[arg-type]

    refunds = [e for e in await ledger_events(bus, "alice") if isinstance(e, CreditsRefunded)]
    assert len(refunds) == 1 and refunds[0].data.amount == 5
    assert (await credits.read_ledger(bus, "alice")).balance == 5
    assert not await credits.settle(bus, job.task_id, "alice", succeeded=True)  # no charge after it
    assert not [e for e in await ledger_events(bus, "alice") if isinstance(e, CreditsCharged)]


async def test_a_fresh_ledger_consumer_redelivered_every_terminal_event_changes_nothing(settings, bus):
    """The whole terminal history delivered again (a new durable starts from the first event)."""
    await two_jobs_that_end(bus, balance=6, cost=3)

    async def drained() -> bool:
        try:
            info = await bus.js.consumer_info(bus.stream, "ledger")
        except Exception:
            return False
        return info.num_pending == 0 and info.num_ack_pending == 0

    for _ in range(2):
        stop = asyncio.Event()
        runner = asyncio.create_task(ledger_worker.main(settings, stop))
        await wait_for(drained)
        stop.set()
        await runner
        after = await credits.read_ledger(bus, "alice")
        assert (after.balance, after.used, after.open_tasks) == (3, 3, {})
        await bus.js.delete_consumer(bus.stream, "ledger")
    kinds = [type(e).__name__ for e in await ledger_events(bus, "alice")]
    assert kinds.count("CreditsCharged") == 1 and kinds.count("CreditsRefunded") == 1


def test_ledger_subjects_and_msg_ids_are_safe_and_keyed_by_task():
    job = request("alice@example.com")
    held = CreditsHeld(
        task_id=job.task_id,
        user_id=job.user_id,
        data=CreditsHeldData(balance_after=0, used_after=0, amount=1, model="m", request=job),
    )
    token = ledger_token("alice@example.com")
    assert token.startswith("h-") and "." not in token and ledger_token("h-x") != "h-x"
    assert held.subject("flux") == f"flux.credits.{token}" and ledger_token("bob_1") == "bob_1"
    assert held.msg_id == f"credits.{job.task_id}.held"
    charged = CreditsCharged(
        task_id=job.task_id,
        user_id=job.user_id,
        data=CreditsSettledData(balance_after=0, used_after=1, amount=1),
    )
    refunded = CreditsRefunded(
        task_id=job.task_id,
        user_id=job.user_id,
        data=CreditsSettledData(balance_after=1, used_after=0, amount=1),
    )
    assert charged.msg_id == refunded.msg_id == f"credits.{job.task_id}.settled"
    assert decode_event(encode_event(held)) == held
    with pytest.raises(ValueError):
        CreditsSettledData(balance_after=-1, used_after=0, amount=1)


async def test_concurrent_holds_never_overspend(bus):
    await credits.grant(bus, "alice", 10, "welcome", actor="root")

    async def attempt() -> str:
        try:
            await credits.hold(bus, request(), 1, max_open=0)
        except credits.InsufficientCredits:
            return "refused"
        return "held"

    outcomes = await asyncio.gather(*(attempt() for _ in range(50)))
    assert outcomes.count("held") == 10 and outcomes.count("refused") == 40
    assert all(e.data.balance_after >= 0 for e in await ledger_events(bus, "alice"))
    assert (await credits.read_ledger(bus, "alice")).balance == 0


async def test_a_hold_without_its_request_is_published_by_the_ledger_worker(bus, ledger_running):
    """The gateway held the credits and died before publishing the job: it is not lost."""
    await credits.grant(bus, "alice", 2, "welcome", actor="root")
    job = request()
    await credits.hold(bus, job, 2, max_open=0)

    async def requested() -> bool:
        return await bus.last_event(job.task_id, "requested") is not None

    await wait_for(requested, timeout=20)
    story = await bus.task_story(job.task_id)
    assert [e.event_id for _, e in story] == [job.event_id]
    ack = await bus.publish(job)  # the gateway coming back: the same msg id, dropped
    assert ack.duplicate


async def test_taking_back_more_than_the_balance_is_refused(bus):
    await credits.grant(bus, "alice", 3, "welcome", actor="root")
    with pytest.raises(credits.NegativeBalance, match="the balance is 3"):
        await credits.grant(bus, "alice", -4, "oops", actor="root")


async def test_replaying_the_log_gives_the_same_balances(bus, engine):
    await credits.grant(bus, "alice", 10, "welcome", actor="root")
    await credits.grant(bus, "bob", 4, "welcome", actor="root")
    jobs = [request("alice"), request("alice"), request("bob")]
    for job in jobs:
        await credits.hold(bus, job, 2, max_open=0)
    await credits.settle(bus, jobs[0].task_id, "alice", succeeded=True)
    await credits.settle(bus, jobs[1].task_id, "alice", succeeded=False)
    await credits.grant(bus, "bob", -1, "correction", actor="root")

    async def project_all() -> list[tuple]:
        stop = asyncio.Event()
        runner = asyncio.create_task(project(bus, engine, stop))

        async def caught_up() -> bool:
            async with engine.connect() as conn:
                n = (await conn.execute(text("select count(*) from flux_credit_ledger"))).scalar_one()
            return n == 8

        await wait_for(caught_up)
        stop.set()
        await runner
        async with engine.connect() as conn:
            rows = await conn.execute(
                text("select user_id, credits_balance, total_used from flux_credits order by user_id")
            )
            return [tuple(r) for r in rows]

    first = await project_all()
    assert first == [("alice", 8, 2), ("bob", 1, 0)]
    async with engine.begin() as conn:
        await conn.execute(text("TRUNCATE flux_credits, flux_credit_ledger, projector_checkpoints"))
    assert await project_all() == first
