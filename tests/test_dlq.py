"""Dead letters are listed and re-driven to the consumer that parked them, at most once."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import httpx
from PIL import Image

from schemas.events import (
    ProviderImage,
    TaskCompleted,
    TaskCompletedData,
    TaskRequested,
    TaskRequestedData,
)
from services.common.bus import Bus
from services.common.consumer import Consumer
from services.common.ending import storage_failed_dead_lettered
from services.common.settings import Settings
from services.common.storage import LocalStorage, MeteredStorage
from services.ops.dlq import Filter, letters, redrive
from services.uploader.main import on_completed
from tests.test_bus import wait_for


def png_data_uri() -> str:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


async def tokens(bus: Bus, task_id: str) -> list[str]:
    return [event.token for _, event in await bus.task_story(task_id)]


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "NATS_URL": settings.nats_url,
        "DATABASE_URL": settings.database_url,
        "FLUXPIPE_STREAM": settings.stream_name,
        "FLUXPIPE_SUBJECT_PREFIX": settings.subject_prefix,
    }
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args], env=env, capture_output=True, text=True, timeout=60
    )


async def test_a_dead_letter_is_listed_and_redriven_once(bus, settings, tmp_path: Path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("storage cannot be created under a file")
    storage = MeteredStorage(LocalStorage(blocker / "storage", "http://gw"), "local")
    consumer = Consumer(
        durable="uploader",
        token="completed",
        max_deliver=1,
        backoff=(0.1,),
        on_dead_letter=storage_failed_dead_lettered,
    )
    ids = {"task_id": "t1", "user_id": "alice"}
    await bus.publish(
        TaskRequested(**ids, data=TaskRequestedData(model="fal-ai/flux-1/dev", task_type="text_to_image"))
    )
    await bus.publish(
        TaskCompleted(
            **ids, data=TaskCompletedData(request_id="r1", images=(ProviderImage(url=png_data_uri()),))
        )
    )
    stop = asyncio.Event()
    async with httpx.AsyncClient() as http:
        handler = partial(on_completed, bus=bus, storage=storage, http=http, settings=settings, max_deliver=3)
        serving = asyncio.create_task(consumer.serve(bus, handler, stop))  # type: ignore[arg-type]
        try:

            async def parked() -> bool:
                return "storage_failed" in await tokens(bus, "t1")

            await wait_for(parked)
            [letter] = await letters(bus)
            assert (letter.consumer, letter.task_id, letter.event_type) == (
                "uploader",
                "t1",
                "task.completed",
            )
            assert "could not store" not in letter.reason and letter.reason  # the handler's own error
            assert letter.subject == f"{bus.prefix}.task.t1.completed" and letter.redriven_as is None
            listed = cli(settings, "dlq", "list", "--json")
            assert listed.returncode == 0, listed.stderr
            assert [json.loads(line)["seq"] for line in listed.stdout.splitlines()] == [letter.seq]

            blocker.unlink()  # the operator fixed the storage
            first = await redrive(bus, letter)
            assert first.outcome == "redriven"

            async def stored() -> bool:
                return "stored" in await tokens(bus, "t1")

            await wait_for(stored)
            again = cli(settings, "dlq", "redrive", str(letter.seq))
            assert again.returncode == 0, again.stderr
            assert "already redriven" in again.stdout
            [relisted] = await letters(bus, Filter(consumer="uploader"))
            assert relisted.redriven_as is not None
            assert await letters(bus, Filter(pending_only=True)) == []
            assert (await redrive(bus, relisted)).outcome == "already redriven"
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await serving
    story = await tokens(bus, "t1")
    # The re-driven copy is in the log once (marked Fluxpipe-Redrive-Of), and one copy was stored.
    assert story == ["requested", "completed", "storage_failed", "completed", "stored"]
    assert (storage.inner.root / "users/alice/flux_fal-ai_flux-1_dev_t1.png").exists()  # type: ignore[attr-defined]


async def test_projector_letters_are_not_redriven_but_replayed(bus):
    await bus.dead_letter("projector", f"{bus.prefix}.task.t2.requested", 1, b"{}", "cannot be projected")
    [letter] = await letters(bus, Filter(task_id="t2"))
    outcome = await redrive(bus, letter)
    assert outcome.outcome == "refused" and "replay" in outcome.detail
