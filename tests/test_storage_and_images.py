"""Local storage, image checks, and the log filter that keeps secrets out of log lines."""

from __future__ import annotations

import io
import logging

import pytest
from PIL import Image

from services.common.images import NotAnImage, inspect_image
from services.common.runtime import RedactingFormatter
from services.common.storage import LocalStorage
from services.uploader.main import result_key


def png(width: int = 8, height: int = 6) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


async def test_local_storage_writes_atomically_and_returns_the_public_url(tmp_path):
    storage = LocalStorage(tmp_path, "http://gw:8080/")
    url = await storage.put("flux_a_b.png", png(), "image/png", {})
    assert url == "http://gw:8080/files/flux_a_b.png"
    assert (tmp_path / "flux_a_b.png").read_bytes() == png()
    assert await storage.put("flux_a_b.png", png(), "image/png", {}) == url
    assert [p.name for p in tmp_path.iterdir()] == ["flux_a_b.png"]
    assert storage.key_for_url(url) == "flux_a_b.png" and storage.key_for_url("http://else/x") is None
    assert await storage.get("flux_a_b.png") == png()
    await storage.delete("flux_a_b.png")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs", "a/../../b", ""])
async def test_local_storage_refuses_keys_that_leave_its_folder(tmp_path, key):
    with pytest.raises(ValueError, match="unsafe storage key"):
        await LocalStorage(tmp_path, "http://gw").put(key, b"x", "image/png", {})


def test_images_are_identified_by_content_not_name():
    info = inspect_image(png(8, 6))
    assert (info.format, info.content_type, info.extension, info.width, info.height) == (
        "PNG",
        "image/png",
        "png",
        8,
        6,
    )
    with pytest.raises(NotAnImage, match="not a decodable image"):
        inspect_image(b"<html>not an image</html>")
    with pytest.raises(NotAnImage):
        inspect_image(png()[:40])


def test_result_keys_follow_the_plan():
    assert result_key("fal-ai/flux-1/dev", "abc", 0, "jpg") == "flux_fal-ai_flux-1_dev_abc.jpg"
    assert result_key("fal-ai/flux-1/dev", "abc", 2, "png") == "flux_fal-ai_flux-1_dev_abc_2.png"


def test_log_lines_never_carry_a_configured_secret_not_even_in_a_traceback():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(RedactingFormatter("%(levelname)s %(message)s", ["fal-secret-key-123"]))
    logger = logging.getLogger("redaction-test")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    logger.info("calling fal with %s", "Key fal-secret-key-123")
    try:
        raise RuntimeError("header was Key fal-secret-key-123")
    except RuntimeError:
        logger.exception("it failed")
    logger.removeHandler(handler)
    text = stream.getvalue()
    assert "fal-secret-key-123" not in text
    assert "calling fal with Key ***" in text and "RuntimeError: header was Key ***" in text
