"""Every model and mode through the whole stack over HTTP: uploads, input URLs, results.

One ``fluxpipe up`` for the module. A small local image server stands in for "the public
web": it is declared a trusted image host (``FLUXPIPE_TRUSTED_IMAGE_HOSTS``), so it is the
one address that passes the public-address rule, and it serves a photo, a page that is not an
image, and redirects to forbidden addresses.
"""

from __future__ import annotations

import io
import json
import select
import socket
import struct
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from PIL import Image

from schemas.catalog import MODELS, flux1_image_size
from tests.test_e2e import Stack, follow

pytestmark = pytest.mark.timeout(300)

MB = 1024 * 1024


def encode(image: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(width: int, height: int, fmt: str = "PNG") -> bytes:
    image = Image.new("RGB", (width, height), (30, 120, 200))
    image.paste((250, 200, 20), (width // 4, height // 4, width // 2, height // 2))
    return encode(image, fmt)


class _Web(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        routes = {
            "/photo.png": (200, {"Content-Type": "image/png"}, photo(600, 400)),
            "/page.png": (200, {"Content-Type": "image/png"}, b"<html>not an image</html>"),
            "/to-metadata": (302, {"Location": "https://169.254.169.254/latest/meta-data/"}, b""),
            "/to-loopback": (301, {"Location": "https://2130706433/admin.png"}, b""),
            "/gone.png": (404, {}, b"no"),
        }
        code, headers, body = routes.get(self.path, (404, {}, b"no"))
        self.send_response(code)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def web() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Web)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, web: str) -> Iterator[Stack]:
    stack = Stack(
        tmp_path_factory.mktemp("fluxpipe-modes"),
        extra_env={"FLUXPIPE_TRUSTED_IMAGE_HOSTS": web.removeprefix("http://")},
    )
    yield stack
    if stack.proc.poll() is None:
        stack.stop()


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, headers=stack.auth, timeout=30) as client:
        yield client


def upload(client: httpx.Client, data: bytes, name: str = "photo.png") -> httpx.Response:
    return client.post("/api/flux/upload-image", files={"file": (name, data, "application/octet-stream")})


def stored_image(client: httpx.Client, url: str) -> Image.Image:
    r = client.get(url)
    assert r.status_code == 200, url
    image = Image.open(io.BytesIO(r.content))
    image.load()
    return image


# --- the catalog ---------------------------------------------------------------------------


def test_models_lists_the_eleven_with_modes_inputs_and_parameter_schemas(stack: Stack) -> None:
    r = httpx.get(f"{stack.url}/api/flux/models")  # no token needed
    assert r.status_code == 200, r.text
    models = {m["id"]: m for m in r.json()}
    assert set(models) == set(MODELS)
    modes = {m["id"]: (m["mode"], m["min_images"], m["max_images"]) for m in r.json()}
    assert modes["fal-ai/flux-1/dev"] == ("text_to_image", 0, 0)
    assert modes["fal-ai/flux-1/dev/image-to-image"] == ("image_to_image", 1, 1)
    assert modes["fal-ai/flux-1/schnell/redux"] == ("redux", 1, 1)
    assert modes["fal-ai/flux-pro/kontext/max"] == ("kontext_edit", 1, 1)
    assert modes["fal-ai/flux-pro/kontext/multi"] == ("multi_image", 2, 4)
    assert models["fal-ai/flux-pro/kontext"]["name"] == "FLUX.1 Pro (Kontext)"
    assert models["fal-ai/flux-1/dev/redux"]["route"] == "/api/flux/image-to-image"

    i2i = models["fal-ai/flux-1/dev/image-to-image"]["parameters"]
    assert i2i["required"] == ["prompt", "image_url"]
    assert {"type": "number", "default": 0.95, "minimum": 0.01}.items() <= i2i["properties"][
        "strength"
    ].items()
    assert i2i["properties"]["num_inference_steps"]["minimum"] == 10
    schnell = models["fal-ai/flux-1/schnell"]["parameters"]["properties"]
    assert (schnell["num_inference_steps"]["default"], schnell["num_inference_steps"]["maximum"]) == (4, 12)
    kontext = models["fal-ai/flux-pro/kontext/text-to-image"]["parameters"]["properties"]
    assert kontext["safety_tolerance"]["enum"] == ["1", "2", "3", "4", "5", "6"]
    assert "num_inference_steps" not in kontext and "strength" not in kontext
    assert "prompt" not in models["fal-ai/flux-1/schnell/redux"]["parameters"]["properties"]
    assert "guidance_scale" not in models["fal-ai/flux-1/schnell/redux"]["parameters"]["properties"]
    multi = models["fal-ai/flux-pro/kontext/max/multi"]["parameters"]["properties"]["image_urls"]
    assert (multi["minItems"], multi["maxItems"]) == (2, 4)

    edits = httpx.get(f"{stack.url}/api/flux/models", params={"mode": "kontext_edit"}).json()
    assert [m["id"] for m in edits] == ["fal-ai/flux-pro/kontext", "fal-ai/flux-pro/kontext/max"]
    r = httpx.get(f"{stack.url}/api/flux/models", params={"mode": "painting"})
    assert r.status_code == 422 and "mode: Input should be 'text_to_image'" in r.json()["message"]


# --- every model to SUCCESS ----------------------------------------------------------------


def test_every_model_reaches_success_with_images_of_the_requested_size_and_count(
    client: httpx.Client, web: str
) -> None:
    landscape = upload(client, photo(640, 480), "landscape.png")
    portrait = upload(client, photo(512, 768, "JPEG"), "portrait.jpg")
    assert landscape.status_code == portrait.status_code == 201, landscape.text + portrait.text
    mine, tall = landscape.json()["url"], portrait.json()["url"]
    assert (portrait.json()["type"], portrait.json()["width"], portrait.json()["height"]) == (
        "jpeg",
        512,
        768,
    )

    # (route, body, expected image count, expected aspect ratio w/h, exact size if requested)
    custom = flux1_image_size("3:2")
    assert isinstance(custom, dict)
    jobs = [
        ("text-to-image", {"model": "fal-ai/flux-1/dev", "prompt": "a fox", "num_images": 4,
                           "aspect_ratio": "16:9"}, 4, 16 / 9, (1024, 576)),
        ("text-to-image", {"model": "fal-ai/flux-1/schnell", "prompt": "a fox", "aspect_ratio": "3:2"},
         1, 3 / 2, (custom["width"], custom["height"])),
        ("text-to-image", {"model": "fal-ai/flux-pro/kontext/text-to-image", "prompt": "a fox",
                           "num_images": 2, "aspect_ratio": "9:16"}, 2, 9 / 16, None),
        ("text-to-image", {"model": "fal-ai/flux-pro/kontext/max/text-to-image", "prompt": "a fox"},
         1, 1.0, None),
        ("image-to-image", {"model": "fal-ai/flux-1/dev/image-to-image", "prompt": "as a painting",
                            "image_url": mine, "strength": 0.6, "num_images": 2}, 2, 640 / 480, (640, 480)),
        ("image-to-image", {"model": "fal-ai/flux-1/dev/redux", "image_url": tall, "aspect_ratio": "4:3"},
         1, 4 / 3, (1024, 768)),
        ("image-to-image", {"model": "fal-ai/flux-1/schnell/redux", "image_url": mine, "num_images": 3},
         3, 1.0, (1024, 1024)),
        ("image-to-image", {"model": "fal-ai/flux-pro/kontext", "prompt": "add a hat", "image_url": tall},
         1, 512 / 768, None),
        ("image-to-image", {"model": "fal-ai/flux-pro/kontext/max", "prompt": "add a hat",
                            "image_url": f"{web}/photo.png", "aspect_ratio": "16:9"}, 1, 16 / 9, None),
        ("image-to-image", {"model": "fal-ai/flux-pro/kontext/multi", "prompt": "both together",
                            "image_urls": [mine, tall], "num_images": 2}, 2, 640 / 480, None),
        ("image-to-image", {"model": "fal-ai/flux-pro/kontext/max/multi", "prompt": "all three",
                            "image_urls": [tall, mine, f"{web}/photo.png"], "aspect_ratio": "1:1"},
         1, 1.0, None),
    ]  # fmt: skip
    assert {body["model"] for _, body, *_ in jobs} == set(MODELS)
    accepted = []
    for route, body, *_ in jobs:
        r = client.post(f"/api/flux/{route}", json=body)
        assert r.status_code == 202, (body["model"], r.text)
        accepted.append(r.json()["task_id"])

    for task_id, (_, body, count, ratio, exact) in zip(accepted, jobs, strict=True):
        task, _ = follow(client, task_id, {"SUCCESS", "FAILED"})
        assert task["status"] == "SUCCESS", (body["model"], task)
        assert task["model"] == body["model"] and len(task["images"]) == count, task
        assert [img["has_nsfw_concepts"] for img in task["images"]] == [False] * count
        keys = [img["key"] for img in task["images"]]
        prefix = f"users/dev/flux_{body['model'].replace('/', '_')}_{task_id}"
        assert keys == [f"{prefix}{'' if i == 0 else f'_{i}'}.jpg" for i in range(count)]
        for img in task["images"]:
            picture = stored_image(client, img["url"])
            assert picture.size == (img["width"], img["height"])
            assert abs(picture.width / picture.height - ratio) / ratio < 0.12, (body["model"], picture.size)
            if exact:
                assert picture.size == exact, (body["model"], picture.size)
        if "image_url" in body or "image_urls" in body:
            assert task["task_type"] == "image_to_image"
            assert task["input_image_urls"] == body.get("image_urls", [body.get("image_url")])
        if body["model"].endswith("image-to-image"):
            assert task["strength"] == 0.6 and task["num_inference_steps"] == 40


# --- refusals of image jobs ----------------------------------------------------------------


def refusal(client: httpx.Client, body: dict, field: str, says: str) -> None:
    r = client.post("/api/flux/image-to-image", json=body)
    assert r.status_code == 422, (body, r.text)
    message = r.json()["message"]
    assert message.startswith(f"{field}: ") and says in message, message


def test_image_jobs_are_checked_against_the_chosen_model(client: httpx.Client) -> None:
    url = upload(client, photo(64, 64)).json()["url"]
    kontext, multi = "fal-ai/flux-pro/kontext", "fal-ai/flux-pro/kontext/multi"
    refusal(client, {"model": kontext, "prompt": "x"}, "image_url", f"Field required by {kontext}")
    refusal(client, {"model": multi, "prompt": "x", "image_urls": [url]}, "image_urls", "at least 2 items")
    refusal(client, {"model": multi, "prompt": "x", "image_urls": [url] * 5}, "image_urls", "at most 4 items")
    refusal(
        client,
        {"model": multi, "prompt": "x", "image_url": url, "image_urls": [url, url]},
        "image_url",
        f"{multi} does not take this field; it takes model, prompt, image_urls,",
    )
    refusal(
        client,
        {"model": kontext, "prompt": "x", "image_url": url, "strength": 0.5},
        "strength",
        "does not take this field; it takes model, prompt, image_url, num_images, aspect_ratio",
    )
    refusal(
        client, {"model": "fal-ai/flux-1/dev/redux", "prompt": "x", "image_url": url}, "prompt", "not take"
    )
    i2i = {"model": "fal-ai/flux-1/dev/image-to-image", "prompt": "x", "image_url": url}
    refusal(client, {**i2i, "strength": 1.5}, "strength", "less than or equal to 1")
    refusal(client, {**i2i, "num_inference_steps": 5}, "num_inference_steps", "greater than or equal to 10")
    refusal(client, {**i2i, "num_images": 5}, "num_images", "less than or equal to 4")
    refusal(
        client, {**i2i, "model": "fal-ai/flux-9"}, "model", "unknown model 'fal-ai/flux-9'; image models:"
    )
    refusal(client, {**i2i, "model": "fal-ai/flux-1/dev"}, "model", "takes no input image")
    refusal(
        client, {**i2i, "image_url": url.replace("flux_input_", "flux_input_0")}, "image_url", "not an upload"
    )


PRIVATE_URLS = [
    ("https://127.0.0.1/a.png", "loopback"),
    ("https://2130706433/a.png", "loopback"),
    ("https://0x7f000001/a.png", "loopback"),
    ("https://0177.0.0.1/a.png", "loopback"),
    ("https://[::ffff:127.0.0.1]/a.png", "loopback"),
    ("https://localhost/a.png", "resolves to 127.0.0.1"),
    ("https://10.1.2.3/a.png", "private"),
    ("https://192.168.0.10/a.png", "private"),
    ("https://[fc00::5]/a.png", "private"),
    ("https://169.254.1.1/a.png", "link-local"),
    ("https://169.254.169.254/latest/meta-data/", "metadata"),
    ("https://0xa9fea9fe/latest/meta-data/", "metadata"),
    ("https://[::ffff:a9fe:a9fe]/latest/meta-data/", "metadata"),
    ("https://metadata.google.internal/computeMetadata/v1/", "metadata"),
    ("https://239.1.1.1/a.png", "multicast"),
    ("https://240.1.1.1/a.png", "reserved"),
    ("https://0.0.0.0/a.png", "unspecified"),
    ("http://93.184.215.14/a.png", "only https"),
    ("ftp://93.184.215.14/a.png", "only https"),
    ("file:///etc/passwd", "host"),
    ("data:image/png;base64,iVBORw0KGgo=", "host"),
]


@pytest.mark.parametrize(("url", "says"), PRIVATE_URLS)
def test_input_urls_that_are_not_public_images_are_refused(client: httpx.Client, url: str, says: str) -> None:
    body = {"model": "fal-ai/flux-pro/kontext", "prompt": "x", "image_url": url}
    refusal(client, body, "image_url", says)


def test_redirects_other_peoples_uploads_and_non_images_are_refused_and_nothing_is_published(
    client: httpx.Client, stack: Stack, web: str
) -> None:
    before = client.get("/api/flux/history").json()["total"]
    kontext = {"model": "fal-ai/flux-pro/kontext", "prompt": "x"}
    refusal(
        client,
        {**kontext, "image_url": f"{web}/to-metadata"},
        "image_url",
        "169.254.169.254, a cloud metadata",
    )
    refusal(client, {**kontext, "image_url": f"{web}/to-loopback"}, "image_url", "127.0.0.1, a loopback")
    refusal(client, {**kontext, "image_url": f"{web}/page.png"}, "image_url", "not a jpg, png or webp")
    refusal(client, {**kontext, "image_url": f"{web}/gone.png"}, "image_url", "answered HTTP 404")
    mine = upload(client, photo(64, 64)).json()["url"]
    bob = {"Authorization": f"Bearer {stack.cli('token', '--user', 'bob').strip()}"}
    r = client.post("/api/flux/image-to-image", json={**kontext, "image_url": mine}, headers=bob)
    assert r.status_code == 422 and "not one of your uploads" in r.json()["message"]
    multi = {
        "model": "fal-ai/flux-pro/kontext/multi",
        "prompt": "x",
        "image_urls": [mine, f"{web}/to-metadata"],
    }
    refusal(client, multi, "image_urls.1", "metadata")

    # The log is projected in order: once a job sent after the refusals is in the read model,
    # anything the refusals had published would be there too.
    once = {"Idempotency-Key": "modes-1"}
    r = client.post("/api/flux/image-to-image", json={**kontext, "image_url": mine}, headers=once)
    again = client.post("/api/flux/image-to-image", json={**kontext, "image_url": mine}, headers=once)
    assert r.status_code == again.status_code == 202, r.text
    assert again.json()["task_id"] == r.json()["task_id"]
    other = client.post(
        "/api/flux/image-to-image", json={**kontext, "image_url": mine, "seed": 1}, headers=once
    )
    assert other.status_code == 409 and "Idempotency-Key already used" in other.json()["message"]
    follow(client, r.json()["task_id"], {"SUCCESS", "FAILED"})
    assert client.get("/api/flux/history").json()["total"] == before + 1


# --- uploads -------------------------------------------------------------------------------


def test_an_upload_is_re_encoded_without_metadata_or_appended_bytes(
    client: httpx.Client, stack: Stack
) -> None:
    original = photo(120, 80)
    r = upload(client, original + b"PK\x03\x04" + b"zip payload" * 1000, "holiday.png")
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["type"], body["content_type"], body["width"], body["height"]) == (
        "png",
        "image/png",
        120,
        80,
    )
    assert body["filename"] == "holiday.png"
    assert body["key"].startswith("uploads/") and Path(body["key"]).name.startswith("flux_input_")
    stored = client.get(body["url"]).content
    assert stored.endswith(b"IEND\xaeB`\x82") and b"PK\x03\x04" not in stored and len(stored) == body["size"]
    assert Image.open(io.BytesIO(stored)).tobytes() == Image.open(io.BytesIO(original)).tobytes()

    exif = Image.Exif()
    exif[0x010F] = "SecretCam"  # Make
    exif[0x0112] = 6  # Orientation: rotate 90° on display
    tagged = encode(Image.new("RGB", (40, 20), (9, 9, 9)), "JPEG", exif=exif.tobytes())
    r = upload(client, tagged, "phone.jpg")
    assert r.status_code == 201 and (r.json()["width"], r.json()["height"]) == (20, 40)
    stored = client.get(r.json()["url"]).content
    assert b"SecretCam" not in stored and not Image.open(io.BytesIO(stored)).getexif()

    webp = upload(client, encode(Image.new("RGB", (33, 44)), "WEBP"), "x.webp").json()
    assert (webp["type"], webp["url"].endswith(".webp")) == ("webp", True)


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header for a huge image with almost no data: it only explodes when decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("name", "data", "code", "says"),
    [
        (
            "drawing.png",
            b'<svg xmlns="http://www.w3.org/2000/svg"><script>x</script></svg>',
            415,
            "not a jpg",
        ),
        ("notes.png", b"just some text, honestly a picture", 415, "not a jpg, png or webp"),
        ("anim.gif", encode(Image.new("RGB", (8, 8)), "GIF"), 415, "not a jpg, png or webp"),
        ("bomb.png", png_bomb(12_000, 12_000), 422, "too many pixels: 12000x12000; at most 25000000 allowed"),
        ("huge-bomb.png", png_bomb(60_000, 60_000), 422, "too many pixels"),
        ("cut.png", photo(64, 64)[:80], 422, "could not be decoded"),
        ("empty.png", b"", 422, "empty"),
    ],
)
def test_uploads_that_are_not_acceptable_images_are_refused_saying_why(
    client: httpx.Client, name: str, data: bytes, code: int, says: str
) -> None:
    r = upload(client, data, name)
    assert r.status_code == code and says in r.json()["message"], r.text


def test_upload_needs_a_multipart_file_field(client: httpx.Client) -> None:
    r = client.post("/api/flux/upload-image", content=photo(8, 8), headers={"Content-Type": "image/png"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["message"]
    r = client.post("/api/flux/upload-image", files={"image": ("a.png", photo(8, 8))})
    assert r.status_code == 422 and r.json()["message"].startswith("file: Field required")
    r = httpx.post(f"{client.base_url}/api/flux/upload-image", files={"file": ("a.png", photo(8, 8))})
    assert r.status_code == 401


def raw_upload(port: int, headers: dict[str, str], chunks: Iterator[bytes]) -> tuple[int, dict, int]:
    """POST a multipart body chunk by chunk on a raw socket, stopping as soon as the server
    answers; returns the status, the JSON answer and how many body bytes were sent."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall(f"POST /api/flux/upload-image HTTP/1.1\r\nHost: gw\r\n{head}\r\n".encode())
    sent = 0
    sock.setblocking(False)
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            readable, writable, _ = select.select([sock], [sock], [], 30)
            if readable:
                break
            try:
                n = sock.send(view)
            except (BlockingIOError, InterruptedError):
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += n
            view = view[n:]
        else:
            continue
        break
    sock.setblocking(True)
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(65536)
    status_line, _, rest = answer.partition(b"\r\n")
    headers_blob, _, body = rest.partition(b"\r\n\r\n")
    length = next(
        int(h.split(b":")[1]) for h in headers_blob.split(b"\r\n") if h.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += sock.recv(65536)
    sock.close()
    return int(status_line.split()[1]), json.loads(body), sent


def multipart_stream(total: int, boundary: str = "xyzzy") -> Iterator[bytes]:
    """A multipart body whose file is ``total`` bytes, generated as it is sent."""
    yield (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="huge.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    block = b"\x89PNG\r\n\x1a\n" + bytes(64 * 1024 - 8)
    for _ in range(total // len(block)):
        yield block
    yield f"\r\n--{boundary}--\r\n".encode()


def peak_rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))


def test_too_large_uploads_are_refused_while_streaming_without_filling_memory(stack: Stack) -> None:
    gateway = stack.child_pid("gateway")
    before = peak_rss_kb(gateway)
    form = {"Content-Type": "multipart/form-data; boundary=xyzzy", **stack.auth}

    status, body, sent = raw_upload(stack.port, {**form, "Content-Length": str(2 * 1024 * MB)}, iter(()))
    assert (status, sent) == (413, 0) and "larger than" in body["message"]

    eleven = multipart_stream(11 * MB)
    status, body, sent = raw_upload(stack.port, {**form, "Content-Length": str(11 * MB + 200)}, eleven)
    assert status == 413 and "larger than" in body["message"]

    chunked = {**form, "Transfer-Encoding": "chunked"}
    stream = (b"%x\r\n%s\r\n" % (len(c), c) for c in multipart_stream(2 * 1024 * MB))
    status, body, sent = raw_upload(stack.port, chunked, stream)
    assert status == 413 and "larger than" in body["message"]
    assert sent < 64 * MB, f"the gateway read {sent} bytes of a body it should have refused at 10 MB"
    assert peak_rss_kb(gateway) - before < 48 * 1024, "the gateway's memory grew with the upload"

    with httpx.Client(base_url=stack.url, headers=stack.auth, timeout=30) as client:
        assert upload(client, photo(16, 16)).status_code == 201  # and it still serves
    assert stack.child_pid("gateway") == gateway
