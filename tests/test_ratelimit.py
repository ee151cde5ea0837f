"""Per-user rate limits in a JetStream KV bucket: exact under concurrency, per user, with the
seconds until the window ends (the two-process case is in tests/test_gateway_replicas.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.common.ratelimit import RateLimited, RateLimiter


@pytest.fixture
async def limiter(settings, bus) -> AsyncIterator[RateLimiter]:
    settings.rate_limit_uploads, settings.rate_limit_jobs, settings.rate_limit_window = 3, 0, 10**7
    first = await RateLimiter.open(bus, settings)
    yield first


async def test_concurrent_uploads_get_exactly_the_limit(limiter, bus, settings):
    other_process = await RateLimiter.open(bus, settings)  # the bucket exists: opened, not made

    async def upload(i: int) -> int | None:
        try:
            await (limiter if i % 2 else other_process).take("uploads", "alice")
        except RateLimited as exc:
            return exc.retry_after
        return None

    results = await asyncio.gather(*(upload(i) for i in range(20)))
    assert results.count(None) == 3
    assert all(0 < r <= 10**7 for r in results if r is not None)
    await limiter.take("uploads", "bob")  # another user has their own allowance
    with pytest.raises(RateLimited, match="too many uploads: at most 3 per 10000000 seconds"):
        await limiter.take("uploads", "alice")


async def test_a_limit_of_zero_is_off(limiter):
    for _ in range(10):
        await limiter.take("jobs", "alice")


async def test_a_bucket_lost_with_a_nats_restart_is_made_again(limiter, bus, settings):
    """Memory storage: a restarted NATS has no bucket; the limiter recreates it and goes on."""
    await limiter.take("uploads", "alice")
    await bus.js.delete_key_value(f"{settings.stream_name}_ratelimits")
    for _ in range(3):
        await limiter.take("uploads", "alice")
    with pytest.raises(RateLimited):
        await limiter.take("uploads", "alice")


async def test_a_count_remembered_by_one_process_never_lets_another_pass(limiter, bus, settings):
    """Each limiter remembers the revision it last wrote and writes on it directly; when the
    other process took meanwhile, that write is refused and the key read again, so the two
    together still stop at exactly the limit, taking turns."""
    other_process = await RateLimiter.open(bus, settings)
    taken = []
    for i in range(6):
        try:
            await (limiter if i % 2 else other_process).take("uploads", "carol")
            taken.append(i)
        except RateLimited:
            pass
    assert taken == [0, 1, 2]
    for each in (limiter, other_process):
        with pytest.raises(RateLimited):
            await each.take("uploads", "carol")
