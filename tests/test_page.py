"""The image page at ``/``, used as a person would: Debian's Chromium driven by Playwright
against ``fluxpipe up``. Each test saves screenshots to ``test-screenshots/`` (or
``$FLUXPIPE_SCREENSHOTS``) so a reviewer can look at what the browser showed."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.test_e2e import Stack

pytestmark = pytest.mark.timeout(300)

CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(os.environ.get("FLUXPIPE_SCREENSHOTS", "test-screenshots"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(
        tmp_path_factory.mktemp("fluxpipe-page"),
        extra_env={"FLUXPIPE_SIM_QUEUE_SECONDS": "0.3", "FLUXPIPE_SIM_RUN_SECONDS": "1.0"},
    )
    yield stack
    if stack.proc.poll() is None:
        stack.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), "Chromium is missing: run ./scripts/install-browser.sh (make test does)"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-sync"],
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, stack: Stack, request: pytest.FixtureRequest) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(stack.url + "/")
    page.get_by_label("Token").fill(stack.token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#whoami")).to_have_text("Signed in.")
    yield page
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{request.node.name}.png"), full_page=True)
    context.close()


def png(tmp_path: Path, name: str = "input.png") -> Path:
    path = tmp_path / name
    Image.new("RGB", (320, 240), (40, 120, 200)).save(path)
    return path


def test_generate_watch_it_finish_and_find_it_in_the_gallery(page: Page) -> None:
    page.get_by_label("Model").select_option("fal-ai/flux-1/schnell")
    page.get_by_label("Prompt", exact=True).fill("a paper boat on a pond")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#task-status")).to_have_text("SUCCESS", timeout=60_000)
    result = page.locator("#task-result img").first
    expect(result).to_be_visible()
    assert page.locator("#task-log li").count() >= 3  # the live feed showed the story
    gallery = page.locator("#items li", has_text="a paper boat on a pond").first
    expect(gallery).to_be_visible(timeout=20_000)
    expect(gallery.locator(".tag")).to_have_text("FLUX.1 Schnell")


def test_image_to_image_with_an_upload(page: Page, tmp_path: Path) -> None:
    page.get_by_label("Image to image").check()
    page.get_by_label("Model").select_option("fal-ai/flux-pro/kontext")
    page.get_by_label("Input image(s)").set_input_files(str(png(tmp_path)))
    expect(page.locator("#previews img")).to_have_count(1)
    page.get_by_label("Prompt", exact=True).fill("make it night")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#task-status")).to_have_text("SUCCESS", timeout=60_000)
    src = page.locator("#task-result img").first.get_attribute("src")
    assert src
    image = Image.open(io.BytesIO(page.request.get(src).body()))
    assert image.size[0] > 0


def test_a_refused_upload_is_shown_as_an_error(page: Page, tmp_path: Path) -> None:
    fake = tmp_path / "notes.png"
    fake.write_text("this is not an image")
    page.get_by_label("Image to image").check()
    page.get_by_label("Input image(s)").set_input_files(str(fake))
    expect(page.locator("#error")).to_contain_text("image", timeout=10_000)
    expect(page.locator("#previews img")).to_have_count(0)
