"""The uploader: ``TaskCompleted`` → download fal's images → our storage → ``ImagesStored``.

Idempotent: storage keys are derived from user, model, task and image index
(``users/<user>/flux_<model>_<task>[_<n>].<ext>``), so a redelivered ``TaskCompleted``
rewrites the same objects and publishes the same ``ImagesStored`` (same msg id, dropped by the
server); once ``ImagesStored`` is in the log a redelivery stores nothing. ``ImagesStored``
records each object's key and unsigned address, never a pre-signed URL (the gateway signs
fresh ones when it answers).

Failures: the storage backend retries transient errors itself (with backoff); if they persist
the message is redelivered; downloads failing for network reasons are retried through
redelivery. Bytes that are not an image, a storage refusal (bad credentials, no such bucket)
or a last attempt that fails end in ``StorageFailed`` with the reason (no credentials in it);
a storage failure also parks the message as a dead letter, so re-driving it once storage is
fixed makes the copy. The task stays SUCCESS either way: fal's URL remains.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import logging
from functools import partial

import httpx
from nats.aio.msg import Msg

from schemas.events import (
    ImagesStored,
    ImagesStoredData,
    StorageFailed,
    StorageFailedData,
    StoredImage,
    TaskCompleted,
)
from services.common.bus import Bus, PermanentError
from services.common.consumer import Consumer, hold
from services.common.ending import storage_failed_dead_lettered
from services.common.images import NotAnImage, inspect_image
from services.common.result_hosts import ForeignResultHost, result_client
from services.common.settings import Settings
from services.common.storage import Storage, StorageError, make_storage, user_key
from services.common.worker import TypedHandler, Worker

log = logging.getLogger(__name__)


ACK_WAIT = 60.0


def consumer(settings: Settings) -> Consumer:
    return Consumer(
        durable="uploader",
        token="completed",
        ack_wait=ACK_WAIT,
        max_deliver=6,
        concurrency=16,
        on_dead_letter=storage_failed_dead_lettered,
    )


class DownloadTooLarge(Exception):
    pass


async def download(http: httpx.AsyncClient, url: str, max_bytes: int) -> bytes:
    """The bytes at ``url`` (http(s) or a ``data:`` URI), refusing more than ``max_bytes``."""
    if url.startswith("data:"):
        _, _, payload = url.partition(",")
        try:
            data = base64.b64decode(payload, validate=True)
        except ValueError as exc:  # binascii.Error
            raise NotAnImage(f"the data URI is not valid base64: {exc}") from exc
    else:
        buffer = io.BytesIO()  # getvalue() hands over its buffer: the image is never held twice
        async with http.stream("GET", url) as response:
            response.raise_for_status()
            async for chunk in response.aiter_bytes():
                if buffer.tell() + len(chunk) > max_bytes:
                    raise DownloadTooLarge(f"image larger than {max_bytes} bytes")
                buffer.write(chunk)
        data = buffer.getvalue()
    if len(data) > max_bytes:
        raise DownloadTooLarge(f"image larger than {max_bytes} bytes")
    return data


def result_key(model: str, task_id: str, index: int, extension: str) -> str:
    suffix = "" if index == 0 else f"_{index}"
    return f"flux_{model.replace('/', '_')}_{task_id}{suffix}.{extension}"


async def on_completed(
    event: TaskCompleted,
    msg: Msg,
    *,
    bus: Bus,
    storage: Storage,
    http: httpx.AsyncClient,
    settings: Settings,
    max_deliver: int,
) -> None:
    latest = await bus.latest(event.task_id)
    if latest.has_any(("stored",)):
        return
    envelope = {"task_id": event.task_id, "user_id": event.user_id, "causation_id": event.event_id}
    requested = latest.event("requested")
    model = getattr(getattr(requested, "data", None), "model", "unknown")
    prompt = getattr(getattr(requested, "data", None), "prompt", None) or ""
    task_type = getattr(getattr(requested, "data", None), "task_type", None) or "text_to_image"
    stored: list[StoredImage] = []
    try:
        async with hold(msg, every=ACK_WAIT / 3, interruptible=False):
            for index, image in enumerate(event.data.images):
                data = await download(http, image.url, settings.max_image_bytes)
                info = await asyncio.to_thread(inspect_image, data)
                key = user_key(event.user_id, result_key(model, event.task_id, index, info.extension))
                await storage.put(
                    key,
                    data,
                    info.content_type,
                    {
                        "source": "flux",
                        "task_id": event.task_id,
                        "model": model,
                        "prompt": prompt[:512],
                        "task_type": task_type,
                    },
                )
                stored.append(
                    StoredImage(
                        url=storage.object_url(key),
                        key=key,
                        content_type=info.content_type,
                        width=info.width,
                        height=info.height,
                        size=len(data),
                    )
                )
    except (NotAnImage, DownloadTooLarge, ForeignResultHost) as exc:
        await bus.publish(StorageFailed(**envelope, data=StorageFailedData(error=str(exc))))
        return
    except StorageError as exc:
        if exc.transient and msg.metadata.num_delivered < max_deliver:
            raise
        await bus.publish(StorageFailed(**envelope, data=StorageFailedData(error=str(exc))))
        raise PermanentError(str(exc)) from None
    except (httpx.HTTPError, OSError) as exc:
        if msg.metadata.num_delivered < max_deliver:
            raise
        await bus.publish(StorageFailed(**envelope, data=StorageFailedData(error=f"could not store: {exc}")))
        return
    await bus.publish(ImagesStored(**envelope, data=ImagesStoredData(images=tuple(stored))))
    log.info("task %s: stored %d image(s)", event.task_id, len(stored))


async def _setup(
    settings: Settings, bus: Bus, stack: contextlib.AsyncExitStack
) -> tuple[Consumer, TypedHandler[TaskCompleted]]:
    http = await stack.enter_async_context(
        result_client(settings, timeout=httpx.Timeout(60, connect=10), follow_redirects=True)
    )
    spec = consumer(settings)
    storage = make_storage(settings)
    stack.callback(storage.close)
    handler = partial(
        on_completed,
        bus=bus,
        storage=storage,
        http=http,
        settings=settings,
        max_deliver=spec.max_deliver,
    )
    return spec, handler


worker = Worker("uploader", TaskCompleted, _setup)
main = worker.main
