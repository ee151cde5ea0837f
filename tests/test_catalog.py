"""The model catalog turns our parameters into what each fal model accepts."""

from __future__ import annotations

from schemas.catalog import MODELS, TEXT_TO_IMAGE_MODELS, build_fal_input, flux1_image_size

PARAMS = {
    "prompt": "a fox",
    "image_urls": ["https://img/1.png", "https://img/2.png"],
    "num_images": 2,
    "aspect_ratio": "16:9",
    "guidance_scale": 4.0,
    "num_inference_steps": 8,
    "seed": 42,
    "safety_tolerance": "3",
    "strength": 0.8,
    "output_format": "png",
}


def test_all_eleven_models_are_listed():
    assert len(MODELS) == 11
    assert set(TEXT_TO_IMAGE_MODELS) == {
        "fal-ai/flux-1/dev",
        "fal-ai/flux-1/schnell",
        "fal-ai/flux-pro/kontext/text-to-image",
        "fal-ai/flux-pro/kontext/max/text-to-image",
    }


def test_flux1_text_to_image_gets_image_size_and_steps_but_no_kontext_fields():
    out = build_fal_input(MODELS["fal-ai/flux-1/dev"], PARAMS)
    assert out == {
        "prompt": "a fox",
        "num_images": 2,
        "seed": 42,
        "output_format": "png",
        "guidance_scale": 4.0,
        "num_inference_steps": 8,
        "image_size": "landscape_16_9",
    }


def test_image_to_image_sends_strength_and_no_image_size():
    out = build_fal_input(MODELS["fal-ai/flux-1/dev/image-to-image"], PARAMS)
    assert out["image_url"] == "https://img/1.png" and out["strength"] == 0.8
    assert "image_size" not in out


def test_schnell_redux_has_no_guidance_and_no_required_prompt():
    out = build_fal_input(MODELS["fal-ai/flux-1/schnell/redux"], {**PARAMS, "prompt": None})
    assert "guidance_scale" not in out and "prompt" not in out
    assert out["image_url"] == "https://img/1.png"


def test_kontext_multi_sends_every_image_and_aspect_ratio():
    out = build_fal_input(MODELS["fal-ai/flux-pro/kontext/max/multi"], PARAMS)
    assert out["image_urls"] == ["https://img/1.png", "https://img/2.png"]
    assert out["aspect_ratio"] == "16:9" and out["safety_tolerance"] == "3"
    assert "num_inference_steps" not in out and "image_size" not in out


def test_unnamed_ratios_become_about_one_megapixel_in_multiples_of_16():
    size = flux1_image_size("21:9")
    assert isinstance(size, dict)
    assert size["width"] % 16 == 0 and size["height"] % 16 == 0
    assert 0.9e6 < size["width"] * size["height"] < 1.1e6
    assert size["width"] > size["height"]
