"""Who may call the gateway: our tokens, Open WebUI's session tokens and forwarded users, service
keys; admins; and that a user only ever sees their own tasks."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any
from urllib.parse import quote

import httpx
import jwt
import pytest
from pydantic import SecretStr

from schemas.events import TaskRequested
from services.common.auth import issue_token, parse_ttl
from services.common.settings import Settings
from services.gateway.app import create_app

WEBUI_SECRET = "webui-secret-" + "w" * 40
FORWARD_SECRET = "forwarded-jwt-secret-" + "f" * 40
OPEN_WEBUI_KEY = "svc-openwebui-" + "k" * 40
REPORTS_KEY = "svc-reports-" + "r" * 40


@pytest.fixture
def auth_settings(settings: Settings) -> Settings:
    keys = [
        {"user_id": "open-webui", "key": OPEN_WEBUI_KEY, "assert_users": True},
        {"user_id": "reports", "key": REPORTS_KEY},
    ]
    return settings.model_copy(
        update={
            "webui_secret_key": SecretStr(WEBUI_SECRET),
            "webui_forwarded_jwt_secret": SecretStr(FORWARD_SECRET),
            "service_keys": SecretStr(json.dumps(keys)),
            "admin_users": "carol, ops-team",
        }
    )


@pytest.fixture
async def client(auth_settings, engine, bus) -> AsyncIterator[httpx.AsyncClient]:
    auth_settings.database_url = engine.url.render_as_string(hide_password=False)
    app = create_app(auth_settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def ours(settings: Settings, **claims: Any) -> str:
    now = int(time.time())
    base = {"sub": "alice", "iat": now, "exp": now + 600, "iss": settings.jwt_issuer}
    return jwt.encode({**base, **claims}, settings.jwt_secret.get_secret_value(), algorithm="HS256")


def session(**claims: Any) -> str:
    now = int(time.time())
    base = {"id": "u-1234", "exp": now + 600, "jti": uuid.uuid4().hex, "typ": "session", "iat": now}
    return jwt.encode({k: v for k, v in {**base, **claims}.items() if v is not None}, WEBUI_SECRET)


def forwarded_jwt(secret: str = FORWARD_SECRET, algorithm: str = "HS256", **claims: Any) -> str:
    now = int(time.time())
    base = {
        "sub": "u-5678",
        "email": "dora@example.com",
        "name": "Dora",
        "role": "user",
        "iss": "open-webui",
        "iat": now,
        "exp": now + 300,
    }
    return jwt.encode({**base, **claims}, secret, algorithm=algorithm)


def unsigned(claims: dict[str, Any]) -> str:
    return jwt.encode(claims, None, algorithm="none")  # type: ignore[arg-type]


async def submit(client: httpx.AsyncClient, headers: dict[str, str], prompt: str = "p") -> str:
    r = await client.post("/api/flux/text-to-image", json={"prompt": prompt}, headers=headers)
    assert r.status_code == 202, r.text
    return str(r.json()["task_id"])


async def owner(bus, task_id: str) -> str:
    event = await bus.last_event(task_id, "requested")
    assert isinstance(event, TaskRequested)
    return event.user_id


async def test_our_token_names_the_user(client, auth_settings, bus):
    task_id = await submit(client, bearer(ours(auth_settings)))
    assert await owner(bus, task_id) == "alice"


def bad_tokens_of_ours(settings: Settings) -> dict[str, str]:
    now = int(time.time())
    secret = settings.jwt_secret.get_secret_value()
    return {
        "forged": ours(settings.model_copy(update={"jwt_secret": SecretStr("z" * 40)})),
        "expired": ours(settings, iat=now - 7200, exp=now - 3600),
        "wrong issuer": ours(settings, iss="someone-else"),
        "no expiry": issue_token(settings, "alice", ttl=None),
        "alg none": unsigned({"sub": "alice", "iat": now, "exp": now + 600, "iss": settings.jwt_issuer}),
        "HS512": jwt.encode(
            {"sub": "alice", "iat": now, "exp": now + 600, "iss": settings.jwt_issuer},
            secret,
            algorithm="HS512",
        ),
    }


@pytest.mark.parametrize("kind", ["forged", "expired", "wrong issuer", "no expiry", "alg none", "HS512"])
async def test_a_bad_token_of_ours_is_401(client, auth_settings, kind):
    r = await client.get("/api/flux/history", headers=bearer(bad_tokens_of_ours(auth_settings)[kind]))
    assert r.status_code == 401, r.text
    assert r.json()["message"].startswith("invalid token: ")
    assert r.headers["www-authenticate"] == "Bearer"


async def test_admin_must_be_a_real_boolean(client, auth_settings):
    task_id = await submit(client, bearer(ours(auth_settings, sub="bob")))
    for not_admin in ("false", "true", 1, None):
        r = await client.get(
            f"/api/flux/task/{task_id}", headers=bearer(ours(auth_settings, admin=not_admin))
        )
        assert r.status_code == 404, (not_admin, r.text)
    r = await client.get(f"/api/flux/task/{task_id}", headers=bearer(ours(auth_settings, admin=True)))
    assert r.status_code == 200


async def test_listed_user_ids_are_admins_whatever_their_token(client, auth_settings):
    task_id = await submit(client, bearer(ours(auth_settings, sub="bob")))
    r = await client.get(f"/api/flux/task/{task_id}", headers=bearer(ours(auth_settings, sub="carol")))
    assert r.status_code == 200
    r = await client.get(f"/api/flux/task/{task_id}", headers=bearer(session(id="ops-team")))
    assert r.status_code == 200


async def test_open_webui_session_tokens_name_the_user_by_id(client, bus):
    task_id = await submit(client, bearer(session()))
    assert await owner(bus, task_id) == "u-1234"
    older_version = session(typ=None, iat=None)  # before Open WebUI added typ and iat
    r = await client.get(f"/api/flux/task/{task_id}", headers=bearer(older_version))
    assert r.status_code == 200 and r.json()["id"] == task_id


@pytest.mark.parametrize(
    ("token", "why"),
    [
        (jwt.encode({"id": "u-1", "exp": int(time.time()) + 60, "jti": "j"}, "x" * 40), "Signature"),
        (session(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200), "expired"),
        (session(jti=None), "jti"),
        (session(typ="refresh"), "not a session token"),
        (unsigned({"id": "u-1", "exp": int(time.time()) + 60, "jti": "j"}), "alg"),
        (
            jwt.encode(
                {"id": "u-1", "exp": int(time.time()) + 60, "jti": "j"}, WEBUI_SECRET, algorithm="HS512"
            ),
            "alg",
        ),
    ],
    ids=["forged", "expired", "no jti", "not a session", "alg none", "HS512"],
)
async def test_a_bad_open_webui_session_token_is_401(client, token, why):
    r = await client.get("/api/flux/history", headers=bearer(token))
    assert r.status_code == 401 and why in r.json()["message"], r.text


async def test_a_session_token_is_refused_where_no_webui_secret_is_configured(settings, engine, bus):
    app = create_app(settings.model_copy(update={"database_url": engine.url.render_as_string(False)}))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
            r = await c.get("/api/flux/history", headers=bearer(session()))
    assert r.status_code == 401 and "WEBUI_SECRET_KEY is not set" in r.json()["message"]


async def test_a_service_key_asserts_the_forwarded_user_from_headers(client, bus):
    headers = {
        **bearer(OPEN_WEBUI_KEY),
        "X-OpenWebUI-User-Id": "u-9",
        "X-OpenWebUI-User-Name": quote("Zoë Ü"),
        "X-OpenWebUI-User-Email": "zoe@example.com",
        "X-OpenWebUI-User-Role": "user",
    }
    task_id = await submit(client, headers)
    assert await owner(bus, task_id) == "u-9"
    other = {**headers, "X-OpenWebUI-User-Id": "u-10"}
    assert (await client.get(f"/api/flux/task/{task_id}", headers=other)).status_code == 404
    admin = {**other, "X-OpenWebUI-User-Role": "admin"}
    assert (await client.get(f"/api/flux/task/{task_id}", headers=admin)).status_code == 200


async def test_a_service_key_asserts_the_forwarded_user_from_its_jwt(client, bus):
    headers = {**bearer(OPEN_WEBUI_KEY), "X-OpenWebUI-User-Jwt": forwarded_jwt()}
    task_id = await submit(client, headers)
    assert await owner(bus, task_id) == "u-5678"
    admin = {**bearer(OPEN_WEBUI_KEY), "X-OpenWebUI-User-Jwt": forwarded_jwt(sub="u-other", role="admin")}
    assert (await client.get(f"/api/flux/task/{task_id}", headers=admin)).status_code == 200


@pytest.mark.parametrize(
    ("token", "why"),
    [
        (forwarded_jwt(secret="q" * 40), "Signature"),
        (forwarded_jwt(exp=int(time.time()) - 600, iat=int(time.time()) - 900), "expired"),
        (forwarded_jwt(iss="not-open-webui"), "issuer"),
        (forwarded_jwt(algorithm="HS512"), "alg"),
        (unsigned({"sub": "u-1", "iss": "open-webui", "iat": 1, "exp": int(time.time()) + 60}), "alg"),
    ],
    ids=["forged", "expired", "wrong issuer", "HS512", "alg none"],
)
async def test_a_bad_forwarded_user_jwt_is_401(client, token, why):
    headers = {**bearer(OPEN_WEBUI_KEY), "X-OpenWebUI-User-Jwt": token}
    r = await client.get("/api/flux/history", headers=headers)
    assert r.status_code == 401 and why in r.json()["message"], r.text


async def test_forwarded_headers_from_anyone_but_an_asserting_service_are_refused(client, auth_settings, bus):
    forged = {"X-OpenWebUI-User-Id": "victim", "X-OpenWebUI-User-Role": "admin"}
    r = await client.post("/api/flux/text-to-image", json={"prompt": "p"}, headers=forged)
    assert r.status_code == 401
    for caller in (bearer(ours(auth_settings)), bearer(session()), bearer(REPORTS_KEY)):
        r = await client.post("/api/flux/text-to-image", json={"prompt": "p"}, headers={**caller, **forged})
        assert r.status_code == 403 and "assert users" in r.json()["message"], r.text
        r = await client.get(
            "/api/flux/history", headers={**caller, "X-OpenWebUI-User-Jwt": forwarded_jwt(sub="victim")}
        )
        assert r.status_code == 403
    assert [m async for m in bus.iter_raw(bus.task_subject())] == []


async def test_a_token_accepted_before_is_still_checked_against_forwarded_headers(client, auth_settings):
    """The gateway keeps the caller of a verified token; a later request with the same token
    and forwarded-user headers is still judged in full (403), never answered from what it kept."""
    token = bearer(ours(auth_settings))
    assert (await client.get("/api/flux/history", headers=token)).status_code == 200
    forged = {"X-OpenWebUI-User-Id": "victim", "X-OpenWebUI-User-Role": "admin"}
    r = await client.get("/api/flux/history", headers={**token, **forged})
    assert r.status_code == 403 and "assert users" in r.json()["message"], r.text


def test_a_kept_token_is_kept_no_longer_than_its_own_expiry(auth_settings):
    """Verification allows 30 s of leeway past ``exp``; what the gateway keeps never does."""
    from services.common.auth import Principal
    from services.gateway.deps import VerifiedTokens

    kept = VerifiedTokens()
    now = int(time.time())
    live, lapsed = ours(auth_settings), ours(auth_settings, iat=now - 60, exp=now - 10)
    for token in (live, lapsed):
        kept.keep(token, Principal(user_id="alice"))
    assert kept.get(live) == Principal(user_id="alice")
    assert kept.get(lapsed) is None
    kept.keep(REPORTS_KEY, Principal(user_id="reports", via="service-key"))
    assert kept.get(REPORTS_KEY) is None  # service keys are checked every time


async def test_a_users_own_id_forwarded_beside_their_own_token_changes_nothing(client, auth_settings):
    task_id = await submit(client, bearer(ours(auth_settings, sub="bob")))
    own = {"X-OpenWebUI-User-Id": "u-1234", "X-OpenWebUI-User-Role": "admin"}
    r = await client.get("/api/flux/history", headers={**bearer(session()), **own})
    assert r.status_code == 200
    r = await client.get(f"/api/flux/task/{task_id}", headers={**bearer(session()), **own})
    assert r.status_code == 404  # the role header made nobody an admin


async def test_a_service_key_alone_is_its_own_user(client, bus):
    task_id = await submit(client, bearer(REPORTS_KEY))
    assert await owner(bus, task_id) == "reports"
    r = await client.get("/api/flux/history", headers=bearer(REPORTS_KEY[:-1] + "x"))
    assert r.status_code == 401


async def test_another_users_ids_are_not_found_anywhere(client, auth_settings):
    alice, bob = bearer(ours(auth_settings)), bearer(ours(auth_settings, sub="bob"))
    task_id = await submit(client, alice, "alice's secret idea")
    r = await client.get(f"/api/flux/task/{task_id}", headers=bob)
    assert r.status_code == 404 and "alice" not in r.text
    assert (await client.get("/api/flux/history", headers=bob)).json()["total"] == 0
    same_key = {"Idempotency-Key": "k-1"}
    mine = await submit(client, {**alice, **same_key})
    theirs = await submit(client, {**bob, **same_key})
    assert mine != theirs  # the same key from another user is another user's task


async def test_rotating_the_token_secret_keeps_idempotent_submits_one_task(auth_settings, engine, bus):
    rotated = auth_settings.model_copy(update={"jwt_secret": SecretStr("rotated-" + "n" * 40)})
    task_ids = []
    for current in (auth_settings, rotated):
        current = current.model_copy(update={"database_url": engine.url.render_as_string(False)})
        app = create_app(current)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
                headers = {**bearer(issue_token(current, "alice")), "Idempotency-Key": "retry-me"}
                task_ids.append(await submit(c, headers))
    assert task_ids[0] == task_ids[1]
    assert len(await bus.task_story(task_ids[0])) == 1


def test_the_gateway_refuses_to_start_without_an_idempotency_secret(settings):
    with pytest.raises(RuntimeError, match="FLUXPIPE_IDEMPOTENCY_SECRET"):
        create_app(settings.model_copy(update={"idempotency_secret": SecretStr("")}))


def test_the_gateway_refuses_malformed_service_keys_without_echoing_them(settings):
    bad = SecretStr(json.dumps([{"user_id": "x", "key": "short-key-123"}]))
    with pytest.raises(RuntimeError, match="FLUXPIPE_SERVICE_KEYS") as caught:
        create_app(settings.model_copy(update={"service_keys": bad}))
    assert "short-key-123" not in str(caught.value)


def test_token_lifetimes():
    assert parse_ttl("30m") == timedelta(minutes=30) and parse_ttl("7d") == timedelta(days=7)
    for wrong in ("0", "-1h", "forever", "400d"):
        with pytest.raises(ValueError):
            parse_ttl(wrong)


def test_fluxpipe_token_prints_an_expiring_token(tmp_path, settings):
    (tmp_path / "jwt-secret").write_text(settings.jwt_secret.get_secret_value())
    env = {"PATH": "/usr/bin:/bin"}
    command = [sys.executable, "-m", "services.cli", "token", "--user", "eve", "--data-dir", str(tmp_path)]
    for args, lifetime in (([], 12 * 3600), (["--ttl", "30m"], 1800)):
        out = subprocess.run(
            [*command, *args], capture_output=True, text=True, env=env, timeout=60, check=True
        )
        claims = jwt.decode(out.stdout.strip(), options={"verify_signature": False})
        assert claims["exp"] - claims["iat"] == lifetime and claims["admin"] is False
    refused = subprocess.run(
        [*command, "--ttl", "forever"], capture_output=True, text=True, env=env, timeout=60
    )
    assert refused.returncode == 2 and "not a duration" in refused.stderr
