"""Uploads count against the caller's own upload rate limit (``FLUXPIPE_RATE_UPLOADS``), shared
through the same JetStream KV bucket as the job limit; other users are not affected."""

from __future__ import annotations

import io

import httpx
from PIL import Image

from services.common.auth import issue_token
from services.gateway.app import create_app


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), (9, 99, 199)).save(out, "PNG")
    return out.getvalue()


async def test_the_upload_rate_limit_is_per_user_and_says_when_to_retry(settings, engine, bus):
    settings.rate_limit_uploads = 2
    app = create_app(settings)
    alice = {"Authorization": f"Bearer {issue_token(settings, 'alice')}"}
    bob = {"Authorization": f"Bearer {issue_token(settings, 'bob')}"}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:

            async def upload(headers: dict[str, str]) -> httpx.Response:
                files = {"file": ("a.png", png(), "image/png")}
                return await client.post("/api/flux/upload-image", files=files, headers=headers)

            assert [(await upload(alice)).status_code for _ in range(2)] == [201, 201]
            refused = await upload(alice)
            assert refused.status_code == 429, refused.text
            assert int(refused.headers["Retry-After"]) > 0 and "upload" in refused.json()["message"]
            assert (await upload(bob)).status_code == 201
