"""The gateway's HTTP contract: auth, validation messages, accepting jobs, reading tasks."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import SecretStr

from schemas.events import TaskRequested
from services.common.auth import issue_token
from services.gateway.app import create_app


@pytest.fixture
def alice(settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_token(settings, 'alice')}"}


async def test_requests_without_a_valid_token_get_401(client, settings):
    r = await client.post("/api/flux/text-to-image", json={"prompt": "x"})
    assert r.status_code == 401 and "missing bearer token" in r.json()["message"]
    forged = issue_token(settings.model_copy(update={"jwt_secret": SecretStr("y" * 40)}), "alice")
    too_long = issue_token(settings, "a" * 256)
    for token in ("garbage", forged, too_long):
        r = await client.get("/api/flux/history", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401 and r.json()["message"].startswith("invalid token")
        assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ({}, "prompt: Field required"),
        ({"prompt": "x", "num_images": 9}, "num_images: Input should be less than or equal to 4"),
        ({"prompt": "x", "aspect_ratio": "5:4"}, "aspect_ratio"),
        ({"prompt": "x", "model": "fal-ai/flux-9"}, "model: unknown model 'fal-ai/flux-9'"),
        ({"prompt": "x", "model": "fal-ai/flux-pro/kontext"}, "needs an input image"),
        (
            {"prompt": "x", "model": "fal-ai/flux-1/schnell", "num_inference_steps": 28},
            "num_inference_steps must be between 1 and 12 for fal-ai/flux-1/schnell",
        ),
        ({"prompt": "x", "sed": 1}, "sed: Extra inputs are not permitted"),
        ({"prompt": "a\u0000b"}, "prompt: must not contain NUL characters"),
    ],
)
async def test_invalid_jobs_get_422_naming_what_was_wrong(client, alice, bus, body, names):
    r = await client.post("/api/flux/text-to-image", json=body, headers=alice)
    assert r.status_code == 422
    assert names in r.json()["message"]
    assert [m async for m in bus.iter_raw(bus.task_subject())] == []


async def test_a_body_that_is_not_json_gets_422_saying_so(client, alice):
    r = await client.post(
        "/api/flux/text-to-image",
        content=b"prompt=x",
        headers={**alice, "Content-Type": "application/json"},
    )
    assert r.status_code == 422
    assert r.json()["message"].startswith("the request body is not valid JSON")


async def test_a_task_records_the_parameters_the_model_will_really_use(client, alice, bus):
    dev = (await client.post("/api/flux/text-to-image", json={"prompt": "p"}, headers=alice)).json()
    schnell = (
        await client.post(
            "/api/flux/text-to-image", json={"prompt": "p", "model": "fal-ai/flux-1/schnell"}, headers=alice
        )
    ).json()
    kontext = (
        await client.post(
            "/api/flux/text-to-image",
            json={"prompt": "p", "model": "fal-ai/flux-pro/kontext/text-to-image"},
            headers=alice,
        )
    ).json()
    steps = {}
    for accepted in (dev, schnell, kontext):
        r = await client.get(f"/api/flux/task/{accepted['task_id']}", headers=alice)
        steps[r.json()["model"]] = r.json()["num_inference_steps"]
    assert steps == {
        "fal-ai/flux-1/dev": 28,
        "fal-ai/flux-1/schnell": 4,
        "fal-ai/flux-pro/kontext/text-to-image": None,  # kontext has no steps parameter
    }


async def test_a_job_is_accepted_at_once_and_readable_before_it_is_projected(client, alice, bus):
    r = await client.post("/api/flux/text-to-image", json={"prompt": "a red fox", "seed": 5}, headers=alice)
    assert r.status_code == 202
    accepted = r.json()
    assert accepted["status"] == "PENDING" and accepted["model"] == "fal-ai/flux-1/dev"
    assert r.headers["location"] == f"/api/flux/task/{accepted['task_id']}"

    story = await bus.task_story(accepted["task_id"])
    assert len(story) == 1
    event = story[0][1]
    assert isinstance(event, TaskRequested)
    assert event.user_id == "alice" and event.data.prompt == "a red fox" and event.data.seed == 5

    r = await client.get(f"/api/flux/task/{accepted['task_id']}", headers=alice)
    assert r.status_code == 200
    assert r.json()["status"] == "PENDING" and r.json()["prompt"] == "a red fox"


async def test_an_idempotency_key_makes_a_retried_submit_the_same_task(client, alice, bus):
    headers = {**alice, "Idempotency-Key": "click-1"}
    first = (await client.post("/api/flux/text-to-image", json={"prompt": "p"}, headers=headers)).json()
    second = (await client.post("/api/flux/text-to-image", json={"prompt": "p"}, headers=headers)).json()
    assert first["task_id"] == second["task_id"]
    assert len(await bus.task_story(first["task_id"])) == 1


async def test_a_retry_after_the_servers_duplicate_window_still_makes_no_second_job(client, alice, bus):
    info = await bus.js.stream_info(bus.stream)
    info.config.duplicate_window = 0.1  # stands in for the 10 minutes
    await bus.js.update_stream(info.config)
    headers = {**alice, "Idempotency-Key": "slow-client"}
    first = (await client.post("/api/flux/text-to-image", json={"prompt": "p"}, headers=headers)).json()
    await asyncio.sleep(0.3)
    again = await client.post("/api/flux/text-to-image", json={"prompt": "p"}, headers=headers)
    assert again.status_code == 202 and again.json()["task_id"] == first["task_id"]
    assert len(await bus.task_story(first["task_id"])) == 1


async def test_an_idempotency_key_reused_for_another_job_is_a_409(client, alice, bus):
    headers = {**alice, "Idempotency-Key": "click-2"}
    first = await client.post("/api/flux/text-to-image", json={"prompt": "a cat"}, headers=headers)
    other = await client.post("/api/flux/text-to-image", json={"prompt": "a dog"}, headers=headers)
    assert other.status_code == 409 and "Idempotency-Key already used" in other.json()["message"]
    story = await bus.task_story(first.json()["task_id"])
    assert [e.data.prompt for _, e in story if isinstance(e, TaskRequested)] == ["a cat"]


async def test_other_users_tasks_are_not_found(client, alice, settings):
    task_id = (await client.post("/api/flux/text-to-image", json={"prompt": "p"}, headers=alice)).json()[
        "task_id"
    ]
    bob = {"Authorization": f"Bearer {issue_token(settings, 'bob')}"}
    r = await client.get(f"/api/flux/task/{task_id}", headers=bob)
    assert r.status_code == 404 and task_id in r.json()["message"]
    admin = {"Authorization": f"Bearer {issue_token(settings, 'root', admin=True)}"}
    assert (await client.get(f"/api/flux/task/{task_id}", headers=admin)).status_code == 200


async def test_history_pages_are_validated(client, alice):
    r = await client.get("/api/flux/history?limit=1000", headers=alice)
    assert r.status_code == 422 and "limit" in r.json()["message"]
    r = await client.get("/api/flux/history?page=1&limit=5", headers=alice)
    assert r.status_code == 200 and r.json() == {"items": [], "total": 0, "page": 1, "limit": 5}


async def test_when_the_event_log_cannot_take_the_job_the_answer_is_503_and_nothing_is_recorded(
    client, alice, bus, engine
):
    await bus.js.delete_stream(bus.stream)
    r = await client.post("/api/flux/text-to-image", json={"prompt": "p"}, headers=alice)
    assert r.status_code == 503 and "event log" in r.json()["message"]
    assert r.headers["retry-after"] == "2"
    await bus.ensure_stream()
    assert (await client.get("/api/flux/history", headers=alice)).json()["total"] == 0


def test_the_gateway_refuses_to_start_without_a_signing_secret(settings):
    with pytest.raises(RuntimeError, match="FLUXPIPE_JWT_SECRET"):
        create_app(settings.model_copy(update={"jwt_secret": SecretStr("short")}))


@pytest.mark.parametrize("model", ["fal-ai/flux-9", "fal-ai/flux-1/dev/redux"])
def test_the_gateway_refuses_to_start_with_a_default_model_that_cannot_draw_from_text(settings, model):
    with pytest.raises(RuntimeError, match="FLUXPIPE_DEFAULT_MODEL"):
        create_app(settings.model_copy(update={"default_model": model}))
