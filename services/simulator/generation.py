"""The simulated model run: validate the input, fetch input images, draw the outputs.

A run is a pure function of the request's arguments and the input images' bytes (a request
without a seed gets a random one, reported in the result). Output size follows the model's
rules (catalog.output_size), their count `num_images`; each output shows every input image.
In benchmark mode the inputs are only probed for their size and the outputs are pre-drawn.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
from collections.abc import Callable
from typing import Any

import httpx

from services.simulator import outcomes
from services.simulator.catalog import MODELS, fal_error, image_sources, output_size, validate
from services.simulator.images import CONTENT_TYPES, EXTENSIONS, OutputFormat, predrawn, render_image
from services.simulator.inputs import InputFailure, download, load_image
from services.simulator.outcomes import Outcome

Files = dict[str, tuple[bytes, str]]


async def generate(
    *,
    model_id: str,
    arguments: dict[str, Any],
    http: httpx.AsyncClient,
    blocked_words: list[str],
    benchmark: bool,
    inference_seconds: float,
    file_url: Callable[[str], str],
) -> tuple[Outcome, Files]:
    """The outcome of one run and the files it produced (served at `file_url(name)`)."""
    model = MODELS[model_id]
    values, errors = validate(model, arguments)
    if values is None:
        return outcomes.unprocessable(errors), {}
    prompt: str = getattr(values, "prompt", None) or ""
    lowered = prompt.lower()
    if any(word.lower() in lowered for word in blocked_words if word):
        entry = fal_error(("prompt",), outcomes.CONTENT_POLICY_MESSAGE, "content_policy_violation", prompt)
        return outcomes.unprocessable([entry]), {}

    try:
        downloads = [(loc, url, await download(http, url, loc)) for loc, url in image_sources(values)]
    except InputFailure as failure:
        return outcomes.unprocessable([failure.entry]), {}

    seed = values.seed if values.seed is not None else secrets.randbelow(2**32)
    output_format: OutputFormat = values.output_format

    def render() -> tuple[int, int, list[bytes]]:
        inputs = [load_image(data, loc, url, decode=not benchmark) for loc, url, data in downloads]
        width, height = output_size(model, values, [image.size for image in inputs])
        if benchmark:
            return width, height, [predrawn(width, height, output_format)] * values.num_images
        images = [
            render_image(
                prompt=prompt,
                seed=seed,
                index=i,
                width=width,
                height=height,
                output_format=output_format,
                inputs=inputs,
            )
            for i in range(values.num_images)
        ]
        return width, height, images

    try:
        width, height, images = render() if benchmark else await asyncio.to_thread(render)
    except InputFailure as failure:
        return outcomes.unprocessable([failure.entry]), {}

    content_type = CONTENT_TYPES[output_format]
    files: Files = {}
    entries = []
    for i, data in enumerate(images):
        if values.sync_mode:
            url = f"data:{content_type};base64,{base64.b64encode(data).decode()}"
        else:
            name = f"{i}.{EXTENSIONS[output_format]}"
            files[name] = (data, content_type)
            url = file_url(name)
        entries.append({"url": url, "width": width, "height": height, "content_type": content_type})
    body = {
        "images": entries,
        "timings": {"inference": inference_seconds},
        "seed": seed,
        "has_nsfw_concepts": [False] * len(entries),
        "prompt": prompt,
    }
    return Outcome(status_code=200, body=body), files
