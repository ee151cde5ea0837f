"""Models and modes without a stack: per-model validation, fal's input, uploads inlined for
fal, and nsfw flags per image in the read model."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest
from PIL import Image

from schemas.api import InvalidJob, parse_image_job
from schemas.catalog import MODELS, Mode, build_fal_input, params_model
from schemas.events import (
    ImagesStored,
    ImagesStoredData,
    ProviderImage,
    StoredImage,
    TaskCompleted,
    TaskCompletedData,
    TaskRequested,
    TaskRequestedData,
)
from services.common.fal import FalClient
from services.common.images import TooManyPixels, UnsupportedImage, reencode_upload
from services.common.settings import Settings
from services.common.urls import inline_own_uploads, upload_key
from services.projector.projection import fold_task
from tests.simulator_server import TEST_API_KEY
from tests.test_bus import wait_for
from tests.test_workers import ended, serve_submitter, submitter_holds

_FLUX1 = {"num_images", "seed", "sync_mode", "enable_safety_checker", "output_format", "acceleration"}
_KONTEXT = {"seed", "guidance_scale", "sync_mode", "num_images", "output_format", "safety_tolerance",
            "enhance_prompt", "aspect_ratio"}  # fmt: skip
# fal's input fields per model, as shared/fal-protocol.md §7 lists them.
FAL_FIELDS = {
    "fal-ai/flux-1/dev": {"prompt", "image_size", "num_inference_steps", "guidance_scale", *_FLUX1},
    "fal-ai/flux-1/dev/image-to-image": {
        "prompt", "image_url", "strength", "num_inference_steps", "guidance_scale", *_FLUX1
    },
    "fal-ai/flux-1/dev/redux": {"image_url", "image_size", "num_inference_steps", "guidance_scale", *_FLUX1},
    "fal-ai/flux-1/schnell": {"prompt", "image_size", "num_inference_steps", "guidance_scale", *_FLUX1},
    "fal-ai/flux-1/schnell/redux": {"image_url", "image_size", "num_inference_steps", *_FLUX1},
    "fal-ai/flux-pro/kontext": {"prompt", "image_url", *_KONTEXT},
    "fal-ai/flux-pro/kontext/max": {"prompt", "image_url", *_KONTEXT},
    "fal-ai/flux-pro/kontext/multi": {"prompt", "image_urls", *_KONTEXT},
    "fal-ai/flux-pro/kontext/max/multi": {"prompt", "image_urls", *_KONTEXT},
    "fal-ai/flux-pro/kontext/text-to-image": {"prompt", *_KONTEXT},
    "fal-ai/flux-pro/kontext/max/text-to-image": {"prompt", *_KONTEXT},
}  # fmt: skip


def errors_of(body: dict) -> list[tuple[tuple, str]]:
    with pytest.raises(InvalidJob) as caught:
        parse_image_job(body)
    return [(e["loc"], e["msg"]) for e in caught.value.errors]


def test_each_model_declares_what_it_takes_and_fal_gets_only_that():
    url = "https://img.example/a.png"
    assert set(FAL_FIELDS) == set(MODELS)
    for spec in MODELS.values():
        params = params_model(spec)
        sample = {"prompt": "p", "image_urls": (url, url), "num_images": 2, "aspect_ratio": "3:4",
                  "guidance_scale": 4.0, "num_inference_steps": 10, "seed": 1, "safety_tolerance": "3",
                  "strength": 0.5, "output_format": "png"}  # fmt: skip
        sent = build_fal_input(spec, sample)
        accepted = FAL_FIELDS[spec.id]
        assert set(sent) <= accepted, (spec.id, set(sent) - accepted)
        assert ("prompt" in params.model_fields) == (spec.mode is not Mode.REDUX)
        assert ("image_urls" in sent) == (spec.mode is Mode.MULTI_IMAGE)
        assert ("image_url" in sent) == (spec.mode not in (Mode.MULTI_IMAGE, Mode.TEXT_TO_IMAGE))
        assert spec.min_images <= spec.max_images


def test_an_image_job_gets_the_models_defaults_recorded():
    spec, params = parse_image_job(
        {"model": "fal-ai/flux-1/dev/image-to-image", "prompt": "p", "image_url": "u"}
    )
    assert (spec.task_type, params.strength, params.num_inference_steps) == ("image_to_image", 0.95, 40)
    spec, params = parse_image_job({"prompt": "p", "image_url": "u"})
    assert spec.id == "fal-ai/flux-1/dev/image-to-image"
    _, params = parse_image_job({"model": "fal-ai/flux-pro/kontext", "prompt": "p", "image_url": "u"})
    assert params.model_dump()["safety_tolerance"] == "2" and params.model_dump()["aspect_ratio"] is None


def test_image_jobs_name_the_wrong_field_and_what_the_model_takes():
    ((loc, msg),) = errors_of({"model": "fal-ai/flux-1/schnell/redux", "image_url": "u", "guidance_scale": 2})
    assert loc == ("body", "guidance_scale")
    assert msg == (
        "fal-ai/flux-1/schnell/redux does not take this field; it takes model, image_url, num_images, "
        "aspect_ratio, num_inference_steps, seed, output_format"
    )
    found = errors_of({"model": "fal-ai/flux-pro/kontext/max/multi", "prompt": "", "image_urls": ["a"]})
    assert [loc for loc, _ in found] == [("body", "prompt"), ("body", "image_urls")]
    assert errors_of([1, 2]) == [(("body",), "the request body must be a JSON object")]
    assert errors_of({"model": 7})[0][1].startswith("unknown model 7; image models: fal-ai/flux-1/dev/image")
    assert "NUL" in errors_of({"prompt": "a\x00b", "image_url": "u"})[0][1]


def png_bytes(size=(10, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, "PNG")
    return buf.getvalue()


def test_uploads_are_judged_by_content_and_pixels_are_capped_before_decoding():
    with pytest.raises(UnsupportedImage):
        reencode_upload(b"GIF89a" + bytes(100), 10**6)
    with pytest.raises(TooManyPixels, match="10x6; at most 59 allowed"):
        reencode_upload(png_bytes(), 59)
    data, info = reencode_upload(png_bytes(), 60)
    assert (info.extension, info.width, info.height) == ("png", 10, 6)


async def test_our_local_uploads_reach_fal_inline_and_other_urls_unchanged(tmp_path):
    settings = Settings(FLUXPIPE_STORAGE_DIR=str(tmp_path), FLUXPIPE_PUBLIC_URL="http://gw:8080")
    key = upload_key("alice", "flux_input_" + "b" * 32 + ".png")
    (tmp_path / key).parent.mkdir(parents=True)
    (tmp_path / key).write_bytes(png_bytes())
    mine = f"http://gw:8080/files/{key}"
    out = await inline_own_uploads((mine, "https://img.example/a.png"), settings)
    assert out[0] == "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    assert out[1] == "https://img.example/a.png"
    (tmp_path / key).unlink()
    with pytest.raises(FileNotFoundError):
        await inline_own_uploads((mine,), settings)


def test_every_image_keeps_its_nsfw_flag_in_order_also_on_the_stored_copies():
    ids = {"task_id": "t", "user_id": "u"}
    row = fold_task(
        None,
        1,
        TaskRequested(**ids, data=TaskRequestedData(model="fal-ai/flux-1/dev", task_type="text_to_image")),
    )
    images = tuple(ProviderImage(url=f"https://fal/{i}.jpg", width=8, height=8) for i in range(3))
    completed = TaskCompletedData(request_id="r", images=images, has_nsfw_concepts=(False, True, False))
    row = fold_task(row, 2, TaskCompleted(**ids, data=completed))
    assert row is not None
    assert [(i["url"], i["has_nsfw_concepts"]) for i in row["images"]] == [
        ("https://fal/0.jpg", False),
        ("https://fal/1.jpg", True),
        ("https://fal/2.jpg", False),
    ]
    stored = tuple(
        StoredImage(url=f"http://gw/{i}", key=str(i), content_type="image/jpeg", width=8, height=8, size=1)
        for i in range(3)
    )
    row = fold_task(row, 3, ImagesStored(**ids, data=ImagesStoredData(images=stored)))
    assert row is not None
    assert [(i["url"], i["has_nsfw_concepts"]) for i in row["cloud_images"]] == [
        ("http://gw/0", False),
        ("http://gw/1", True),
        ("http://gw/2", False),
    ]


async def test_the_submitter_hands_fal_our_upload_inline_so_fal_needs_no_route_to_us(bus, settings, fast):
    """Our public URL here leads nowhere: the job can only succeed if the image went inline."""
    settings = settings.model_copy(update={"public_base_url": "http://fluxpipe.invalid"})
    key = upload_key("alice", "flux_input_" + "c" * 32 + ".png")
    (settings.storage_dir / key).parent.mkdir(parents=True)
    (settings.storage_dir / key).write_bytes(png_bytes((96, 64)))
    data = TaskRequestedData(
        model="fal-ai/flux-pro/kontext",
        task_type="image_to_image",
        prompt="add a hat",
        image_urls=(f"http://fluxpipe.invalid/files/{key}",),
    )
    await bus.publish(TaskRequested(task_id="up1", user_id="alice", data=data))
    fal = FalClient(fast.public_url, TEST_API_KEY)
    stop = asyncio.Event()
    runner = asyncio.create_task(serve_submitter(bus, fal, settings, stop))
    try:

        async def submitted() -> bool:
            return await bus.last_event("up1", "submitted") is not None

        await wait_for(submitted)
        handle = await bus.last_event("up1", "submitted")
        assert handle is not None and "data:" not in handle.model_dump_json()  # never into an event

        async def done() -> bool:
            return (await fal.status(handle.data.status_url)).status == "COMPLETED"

        await wait_for(done)
        result = await fal.result(handle.data.response_url)
        assert len(result["images"]) == 1
        await bus.publish(ended("up1"))
        await submitter_holds(bus, 0, 0)
    finally:
        stop.set()
        await runner
        await fal.aclose()
