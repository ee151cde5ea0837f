"""The uploader storing results in COS (the real SDK against the local COS), on real NATS.

Four images land under the user's prefix with the plan's names and metadata; a second
delivery stores nothing twice; injected 5xx are retried; bad credentials end in a clear
``StorageFailed`` and a dead letter, and re-driving it once the credentials are fixed stores
the images.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
from collections.abc import AsyncIterator, Iterator
from functools import partial
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from nats.js.errors import NotFoundError
from PIL import Image

from schemas.events import (
    FluxEvent,
    ImagesStored,
    ProviderImage,
    StorageFailed,
    TaskCompleted,
    TaskCompletedData,
    TaskRequested,
    TaskRequestedData,
    decode_event,
)
from services.common.bus import Bus
from services.common.settings import Settings
from services.common.storage import make_storage
from services.uploader.main import consumer, on_completed
from tests.cos_server import SECRET_KEY, RunningCos, running_cos
from tests.test_bus import wait_for

pytestmark = pytest.mark.timeout(120)

MODEL = "fal-ai/flux-1/schnell"


@pytest.fixture(scope="module")
def cos() -> Iterator[RunningCos]:
    with running_cos() as running:
        yield running


def png_uri(shade: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (shade, 40, 90)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def story(task_id: str, images: int) -> tuple[TaskRequested, TaskCompleted]:
    requested = TaskRequested(
        task_id=task_id,
        user_id="alice",
        data=TaskRequestedData(
            model=MODEL, task_type="text_to_image", prompt="海边的灯塔 at dawn", num_images=images
        ),
    )
    completed = TaskCompleted(
        task_id=task_id,
        user_id="alice",
        data=TaskCompletedData(
            request_id="r1", images=tuple(ProviderImage(url=png_uri(i * 50)) for i in range(images))
        ),
    )
    return requested, completed


@contextlib.asynccontextmanager
async def uploader(bus: Bus, settings: Settings, durable: str = "uploader") -> AsyncIterator[None]:
    """The uploader's own consumer and handler, storing with ``settings``' storage."""
    storage = make_storage(settings)
    spec = consumer(settings)
    spec.durable = durable
    handler = partial(on_completed, bus=bus, storage=storage, settings=settings, max_deliver=spec.max_deliver)
    stop = asyncio.Event()
    async with httpx.AsyncClient() as http:

        async def handle(event: FluxEvent, msg: Any) -> None:
            assert isinstance(event, TaskCompleted)
            await handler(event, msg, http=http)

        runner = asyncio.create_task(spec.serve(bus, handle, stop))
        try:
            yield
        finally:
            stop.set()
            await runner
            storage.close()


async def events_of(bus: Bus, task_id: str, token: str) -> list[FluxEvent]:
    return [event for _, event in await bus.task_story(task_id) if event.token == token]


def cos_settings(settings: Settings, cos: RunningCos, **env: str) -> Settings:
    return settings.model_copy(update=Settings(**cos.env(**env)).model_dump(include=_COS_FIELDS))


_COS_FIELDS = {name for name in Settings.model_fields if name.startswith("cos_")} | {"storage_backend"}


async def test_four_images_are_stored_once_under_the_users_prefix_with_the_plans_metadata(bus, settings, cos):
    task_id = "cos4"
    requested, completed = story(task_id, 4)
    await bus.publish(requested)
    await bus.publish(completed)
    stored_settings = cos_settings(settings, cos)
    cos.sim.fail_next(2, status=503)
    puts_before = cos.sim.count("PUT", 200)
    async with uploader(bus, stored_settings):
        await wait_for(lambda: _has(bus, task_id, "stored"))
    async with uploader(bus, stored_settings, durable="uploader-redelivered"):
        await wait_for(lambda: _consumer_done(bus, "uploader-redelivered"))

    [stored] = await events_of(bus, task_id, "stored")
    assert isinstance(stored, ImagesStored)
    keys = [
        f"users/alice/flux_fal-ai_flux-1_schnell_{task_id}{suffix}.png" for suffix in ("", "_1", "_2", "_3")
    ]
    assert [img.key for img in stored.data.images] == keys
    assert [img.url for img in stored.data.images] == [f"{cos.url}/{key}" for key in keys]
    assert all("q-signature" not in img.url for img in stored.data.images)
    assert cos.sim.count("PUT", 200) - puts_before == 4, "each image stored once, despite the second delivery"
    assert cos.sim.count("PUT", 503) >= 2
    meta = cos.sim.objects[keys[3]].metadata
    assert cos.sim.objects[keys[3]].content_type == "image/png"
    assert {k: unquote(v) for k, v in meta.items()} == {
        "x-cos-meta-source": "flux",
        "x-cos-meta-task-id": task_id,
        "x-cos-meta-model": MODEL,
        "x-cos-meta-prompt": "海边的灯塔 at dawn",
        "x-cos-meta-task-type": "text_to_image",
    }
    storage = make_storage(stored_settings)
    async with httpx.AsyncClient() as http:
        image = await http.get(storage.url(keys[2]))
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    storage.close()


async def test_bad_credentials_end_in_a_clear_storage_failed_and_a_dead_letter_that_redrives(
    bus, settings, cos
):
    task_id = "cosbad"
    requested, completed = story(task_id, 1)
    await bus.publish(requested)
    await bus.publish(completed)
    wrong = cos_settings(settings, cos, COS_SECRET_KEY="wrong-secret-key-for-this-test")
    async with uploader(bus, wrong):
        await wait_for(lambda: _has(bus, task_id, "storage_failed"))
        await wait_for(lambda: _dead_letters(bus))

    [failed] = await events_of(bus, task_id, "storage_failed")
    assert isinstance(failed, StorageFailed)
    assert "403 SignatureDoesNotMatch" in failed.data.error and "COS_SECRET_KEY" in failed.data.error
    assert "wrong-secret-key-for-this-test" not in failed.data.error and SECRET_KEY not in failed.data.error
    assert not [key for key in cos.sim.objects if task_id in key]
    [(_, _, parked)] = [m async for m in bus.iter_raw(bus.dlq_subject("uploader"))]
    assert decode_event(parked) == completed

    # Handling the parked event again (what re-driving it does) once the credentials are fixed
    # makes the copy.
    async with uploader(bus, cos_settings(settings, cos), durable="uploader-redrive"):
        await wait_for(lambda: _has(bus, task_id, "stored"))
    [stored] = await events_of(bus, task_id, "stored")
    assert isinstance(stored, ImagesStored)
    assert stored.data.images[0].key in cos.sim.objects


async def _has(bus: Bus, task_id: str, token: str) -> bool:
    return await bus.last_event(task_id, token) is not None


async def _dead_letters(bus: Bus) -> bool:
    return bool([m async for m in bus.iter_raw(bus.dlq_subject("uploader"))])


async def _consumer_done(bus: Bus, durable: str) -> bool:
    try:
        info = await bus.js.consumer_info(bus.stream, durable)
    except NotFoundError:
        return False
    return info.num_pending == 0 and info.num_ack_pending == 0
