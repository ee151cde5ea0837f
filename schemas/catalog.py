"""The eleven FLUX models on fal.ai: what each accepts and how our parameters map onto it.

Source: shared/fal-protocol.md §7. The catalog is pure data plus one pure function,
``build_fal_input``; the submitter uses it to turn a task request into fal's input.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Mode(StrEnum):
    TEXT_TO_IMAGE = "text_to_image"
    IMAGE_TO_IMAGE = "image_to_image"
    REDUX = "redux"
    MULTI_IMAGE = "multi_image"


class Family(StrEnum):
    FLUX1 = "flux1"
    KONTEXT = "kontext"


ASPECT_RATIOS = ("21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21")

# fal's named sizes for FLUX.1 models, by the aspect ratio our API speaks.
_FLUX1_IMAGE_SIZE = {
    "1:1": "square_hd",
    "4:3": "landscape_4_3",
    "3:4": "portrait_4_3",
    "16:9": "landscape_16_9",
    "9:16": "portrait_16_9",
}


@dataclass(frozen=True)
class ModelSpec:
    id: str
    name: str
    mode: Mode
    family: Family
    default_steps: int | None = None
    max_steps: int | None = None
    min_steps: int = 1
    guidance: bool = True
    prompt_required: bool = True

    @property
    def needs_image(self) -> bool:
        return self.mode is not Mode.TEXT_TO_IMAGE


MODELS: dict[str, ModelSpec] = {
    m.id: m
    for m in (
        ModelSpec("fal-ai/flux-1/dev", "FLUX.1 Dev", Mode.TEXT_TO_IMAGE, Family.FLUX1, 28, 50),
        ModelSpec(
            "fal-ai/flux-1/dev/image-to-image",
            "FLUX.1 Dev image-to-image",
            Mode.IMAGE_TO_IMAGE,
            Family.FLUX1,
            40,
            50,
            min_steps=10,
        ),
        ModelSpec(
            "fal-ai/flux-1/dev/redux",
            "FLUX.1 Dev Redux",
            Mode.REDUX,
            Family.FLUX1,
            28,
            50,
            prompt_required=False,
        ),
        ModelSpec("fal-ai/flux-1/schnell", "FLUX.1 Schnell", Mode.TEXT_TO_IMAGE, Family.FLUX1, 4, 12),
        ModelSpec(
            "fal-ai/flux-1/schnell/redux",
            "FLUX.1 Schnell Redux",
            Mode.REDUX,
            Family.FLUX1,
            4,
            12,
            guidance=False,
            prompt_required=False,
        ),
        ModelSpec("fal-ai/flux-pro/kontext", "FLUX.1 Pro (Kontext)", Mode.IMAGE_TO_IMAGE, Family.KONTEXT),
        ModelSpec("fal-ai/flux-pro/kontext/max", "FLUX.1 Pro Max", Mode.IMAGE_TO_IMAGE, Family.KONTEXT),
        ModelSpec(
            "fal-ai/flux-pro/kontext/max/multi", "FLUX.1 Pro Max Multi", Mode.MULTI_IMAGE, Family.KONTEXT
        ),
        ModelSpec(
            "fal-ai/flux-pro/kontext/max/text-to-image",
            "FLUX.1 Pro Max T2I",
            Mode.TEXT_TO_IMAGE,
            Family.KONTEXT,
        ),
        ModelSpec("fal-ai/flux-pro/kontext/multi", "FLUX.1 Pro Multi", Mode.MULTI_IMAGE, Family.KONTEXT),
        ModelSpec(
            "fal-ai/flux-pro/kontext/text-to-image", "FLUX.1 Pro T2I", Mode.TEXT_TO_IMAGE, Family.KONTEXT
        ),
    )
}

TEXT_TO_IMAGE_MODELS = tuple(m.id for m in MODELS.values() if m.mode is Mode.TEXT_TO_IMAGE)


def flux1_image_size(aspect_ratio: str) -> str | dict[str, int]:
    """fal's ``image_size`` for an aspect ratio: a named size, else about one megapixel in
    multiples of 16 (fal has no named size for 21:9, 3:2, 2:3 and 9:21)."""
    if aspect_ratio in _FLUX1_IMAGE_SIZE:
        return _FLUX1_IMAGE_SIZE[aspect_ratio]
    w, h = (int(x) for x in aspect_ratio.split(":"))
    scale = (1024 * 1024 / (w * h)) ** 0.5
    return {"width": round(w * scale / 16) * 16, "height": round(h * scale / 16) * 16}


def build_fal_input(spec: ModelSpec, params: dict[str, Any]) -> dict[str, Any]:
    """fal's input for ``spec`` from a task's parameters, keeping only what the model accepts.

    ``params`` holds our names (prompt, image_urls, num_images, aspect_ratio, guidance_scale,
    num_inference_steps, seed, safety_tolerance, strength, output_format); ``None`` means
    "the model's default" and is left out.
    """
    out: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        if value is not None:
            out[key] = value

    if spec.prompt_required or params.get("prompt"):
        put("prompt", params.get("prompt"))
    images = params.get("image_urls") or []
    if spec.mode is Mode.MULTI_IMAGE:
        out["image_urls"] = list(images)
    elif spec.needs_image:
        put("image_url", images[0] if images else None)
    put("num_images", params.get("num_images"))
    put("seed", params.get("seed"))
    put("output_format", params.get("output_format"))
    if spec.guidance:
        put("guidance_scale", params.get("guidance_scale"))
    if spec.family is Family.FLUX1:
        put("num_inference_steps", params.get("num_inference_steps"))
        if spec.mode is Mode.IMAGE_TO_IMAGE:
            put("strength", params.get("strength"))
        elif params.get("aspect_ratio"):
            out["image_size"] = flux1_image_size(params["aspect_ratio"])
    else:
        put("aspect_ratio", params.get("aspect_ratio"))
        put("safety_tolerance", params.get("safety_tolerance"))
    return out
