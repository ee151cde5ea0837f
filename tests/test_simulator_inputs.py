"""Image inputs at the simulator: fetched over http(s) or from data URIs as fal does, visible in
every output, and usable through fal's own Python client unchanged."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import Iterator

import fal_client
import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import RedirectResponse, Response
from PIL import Image

from services.simulator.settings import SimulatorSettings
from tests.simulator_server import TEST_API_KEY, serve

AUTH = {"Authorization": f"Key {TEST_API_KEY}"}
WAIT_LIMIT_SECONDS = 15.0
GREEN, BLUE, ORANGE = (0, 200, 0), (0, 0, 220), (250, 140, 0)


def png(colour: tuple[int, int, int], size: tuple[int, int] = (120, 120)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(colour: tuple[int, int, int]) -> str:
    return "data:image/png;base64," + base64.b64encode(png(colour)).decode()


@pytest.fixture(scope="module")
def images_host() -> Iterator[str]:
    """A tiny public image host: /green.png, /blue.png, /orange.png, a redirect to green, and
    404 for anything else."""
    colours = {"green": GREEN, "blue": BLUE, "orange": ORANGE}
    app = FastAPI()

    @app.get("/redirect.png")
    async def redirect() -> RedirectResponse:
        return RedirectResponse("/green.png", status_code=302)

    @app.get("/{name}.png")
    async def image(name: str) -> Response:
        if name not in colours:
            return Response(status_code=404)
        return Response(png(colours[name]), media_type="image/png")

    with serve(lambda _: app) as base_url:
        yield base_url


async def run(http: httpx.AsyncClient, sim: SimulatorSettings, model: str, args: dict) -> httpx.Response:
    queued = (await http.post(f"{sim.public_url}/{model}", json=args)).json()
    deadline = time.monotonic() + WAIT_LIMIT_SECONDS
    while (await http.get(queued["status_url"])).json()["status"] != "COMPLETED":
        assert time.monotonic() < deadline, "request never completed"
        await asyncio.sleep(0.02)
    return await http.get(queued["response_url"])


def thumbnail_colour(image: Image.Image, index: int) -> tuple[int, int, int]:
    """The colour at the centre of the `index`-th input thumbnail (bottom-right, leftwards)."""
    width, height = image.size
    box = min(width, height) // 5
    x = width - 6 - index * (box + 6) - box // 2
    y = height - 6 - box // 2
    pixel = image.convert("RGB").getpixel((x, y))
    assert isinstance(pixel, tuple)
    return pixel[0], pixel[1], pixel[2]


def near(actual: tuple[int, int, int], expected: tuple[int, int, int]) -> bool:
    return all(abs(a - e) <= 8 for a, e in zip(actual, expected, strict=True))


async def test_outputs_show_a_thumbnail_of_each_input_in_order(
    fast: SimulatorSettings, images_host: str
) -> None:
    async with httpx.AsyncClient(headers=AUTH, timeout=10) as http:
        multi, redux = await asyncio.gather(
            run(
                http,
                fast,
                "fal-ai/flux-pro/kontext/multi",
                {
                    "prompt": "combine",
                    "image_urls": [f"{images_host}/green.png", data_uri(BLUE), f"{images_host}/redirect.png"],
                    "output_format": "png",
                    "num_images": 3,
                },
            ),
            run(
                http,
                fast,
                "fal-ai/flux-1/dev/redux",
                {"image_url": data_uri(ORANGE), "output_format": "png", "image_size": "square"},
            ),
        )
        outputs = [await http.get(entry["url"]) for entry in multi.json()["images"]]
        redux_image = await http.get(redux.json()["images"][0]["url"])
    assert multi.status_code == 200 and len(outputs) == 3
    for output in outputs:
        image = Image.open(io.BytesIO(output.content))
        assert image.size == (1024, 1024)
        assert [near(thumbnail_colour(image, i), c) for i, c in enumerate((GREEN, BLUE, GREEN))] == [True] * 3
    square = Image.open(io.BytesIO(redux_image.content))
    assert square.size == (512, 512)
    assert near(thumbnail_colour(square, 0), ORANGE)


async def test_inputs_that_cannot_be_fetched_are_fals_file_download_error(
    fast: SimulatorSettings, images_host: str
) -> None:
    async with httpx.AsyncClient(headers=AUTH, timeout=10) as http:
        missing, second = await asyncio.gather(
            run(
                http,
                fast,
                "fal-ai/flux-pro/kontext/max",
                {"prompt": "x", "image_url": f"{images_host}/gone.png"},
            ),
            run(
                http,
                fast,
                "fal-ai/flux-pro/kontext/max/multi",
                {"prompt": "x", "image_urls": [f"{images_host}/green.png", f"{images_host}/gone.png"]},
            ),
        )
    for response, loc in ((missing, ["body", "image_url"]), (second, ["body", "image_urls", 1])):
        assert response.status_code == 422
        [entry] = response.json()["detail"]
        assert (entry["type"], entry["loc"], entry["msg"]) == (
            "file_download_error",
            loc,
            "File download error",
        )
        assert entry["url"] == "https://docs.fal.ai/errors/#file_download_error"


async def test_each_image_model_runs_through_fals_own_client(
    fast: SimulatorSettings, images_host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fal_client.client, "QUEUE_URL_FORMAT", fast.public_url + "/")
    official = fal_client.AsyncClient(key=TEST_API_KEY)
    cases = {
        "fal-ai/flux-1/dev/redux": {"image_url": f"{images_host}/green.png", "num_images": 2},
        "fal-ai/flux-1/schnell/redux": {"image_url": data_uri(BLUE)},
        "fal-ai/flux-1/dev/image-to-image": {"prompt": "x", "image_url": f"{images_host}/orange.png"},
        "fal-ai/flux-pro/kontext": {"prompt": "night", "image_url": data_uri(GREEN)},
        "fal-ai/flux-pro/kontext/max": {"prompt": "night", "image_url": f"{images_host}/blue.png"},
        "fal-ai/flux-pro/kontext/multi": {"prompt": "mix", "image_urls": [data_uri(GREEN), data_uri(BLUE)]},
        "fal-ai/flux-pro/kontext/max/multi": {
            "prompt": "mix",
            "image_urls": [f"{images_host}/green.png", data_uri(ORANGE)],
            "aspect_ratio": "16:9",
        },
    }

    async def subscribe(model: str, args: dict) -> dict:
        handle = await official.submit(model, args)
        async for _ in handle.iter_events(interval=0.02):
            pass
        return await handle.get()

    results = await asyncio.gather(*(subscribe(model, args) for model, args in cases.items()))
    for (model, args), result in zip(cases.items(), results, strict=True):
        assert len(result["images"]) == args.get("num_images", 1), model
        assert result["images"][0]["url"].startswith(fast.public_url), model
    assert results[2]["images"][0]["width"] == 112  # image-to-image keeps the input's size, in 16s
    wide = results[-1]["images"][0]
    assert abs(wide["width"] / wide["height"] - 16 / 9) < 0.1  # the nearest Kontext resolution

    with pytest.raises(fal_client.client.FalClientHTTPError) as raised:
        await subscribe("fal-ai/flux-1/dev/redux", {"image_url": f"{images_host}/gone.png"})
    assert raised.value.status_code == 422


async def test_every_model_gives_num_images_of_its_size(fast: SimulatorSettings, images_host: str) -> None:
    green = f"{images_host}/green.png"  # 120×120
    cases: dict[str, tuple[dict, tuple[int, int]]] = {
        "fal-ai/flux-1/dev": ({"prompt": "x", "image_size": "square"}, (512, 512)),
        "fal-ai/flux-1/dev/image-to-image": ({"prompt": "x", "image_url": green}, (112, 112)),
        "fal-ai/flux-1/dev/redux": ({"image_url": green, "image_size": "portrait_4_3"}, (768, 1024)),
        "fal-ai/flux-1/schnell": ({"prompt": "x", "image_size": {"width": 640, "height": 320}}, (640, 320)),
        "fal-ai/flux-1/schnell/redux": ({"image_url": data_uri(BLUE)}, (1024, 768)),
        "fal-ai/flux-pro/kontext": ({"prompt": "x", "image_url": green}, (1024, 1024)),
        "fal-ai/flux-pro/kontext/max": (
            {"prompt": "x", "image_url": green, "aspect_ratio": "9:16"},
            (752, 1392),
        ),
        "fal-ai/flux-pro/kontext/multi": (
            {"prompt": "x", "image_urls": [green, data_uri(BLUE)], "aspect_ratio": "1:1"},
            (1024, 1024),
        ),
        "fal-ai/flux-pro/kontext/max/multi": ({"prompt": "x", "image_urls": [green, green]}, (1024, 1024)),
        "fal-ai/flux-pro/kontext/text-to-image": ({"prompt": "x"}, (1024, 1024)),
        "fal-ai/flux-pro/kontext/max/text-to-image": ({"prompt": "x", "aspect_ratio": "21:9"}, (1568, 672)),
    }
    async with httpx.AsyncClient(headers=AUTH, timeout=10) as http:
        results = await asyncio.gather(
            *(
                run(http, fast, model, args | {"num_images": i % 4 + 1})
                for i, (model, (args, _)) in enumerate(cases.items())
            )
        )
        for i, ((model, (_, size)), result) in enumerate(zip(cases.items(), results, strict=True)):
            assert result.status_code == 200, (model, result.text)
            entries = result.json()["images"]
            assert len(entries) == i % 4 + 1, model
            for entry in entries:
                image = Image.open(io.BytesIO((await http.get(entry["url"])).content))
                assert (entry["width"], entry["height"]) == image.size == size, model
