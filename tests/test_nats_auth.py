"""The event log is not an open door: every connection authenticates, and each service may
publish only its own events. A NATS server with the generated users, started for this module."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats.errors
import pytest

from schemas.events import (
    ImagesStored,
    ImagesStoredData,
    StoredImage,
    TaskRequested,
    TaskRequestedData,
    TaskSubmitted,
    TaskSubmittedData,
    encode_event,
)
from services.common.bus import Bus, NatsCredentialsRejected
from services.common.consumer import Consumer
from services.common.embedded import EmbeddedNats, nats_server_binary
from services.common.nats_auth import (
    OPERATOR,
    SERVICES,
    authorization_block,
    compose_config,
    load_or_create_users,
    service_env,
)
from services.common.settings import Settings

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    data = tmp_path_factory.mktemp("secured-nats")
    users = load_or_create_users(data)
    server = EmbeddedNats.start(data / "nats", auth=authorization_block(users, "FLUX", "flux"))
    yield server.url, users
    server.stop()


def as_user(secured: tuple[str, dict[str, str]], user: str, password: str | None = None) -> Settings:
    url, users = secured
    env = service_env(users, user)
    return Settings(NATS_URL=url, NATS_USER=user, NATS_PASSWORD=password or env["NATS_PASSWORD"])


@pytest.fixture
async def operator(secured) -> AsyncIterator[Bus]:
    bus = await Bus.connect(as_user(secured, OPERATOR), "test-operator")
    yield bus
    await bus.js.delete_stream(bus.stream)
    await bus.close()


def requested(task_id: str, user: str = "alice") -> TaskRequested:
    return TaskRequested(
        task_id=task_id,
        user_id=user,
        data=TaskRequestedData(model="fal-ai/flux-1/dev", task_type="text_to_image", prompt="p"),
    )


def forged_submitted(task_id: str) -> TaskSubmitted:
    evil = "https://attacker.example/steal"
    return TaskSubmitted(
        task_id=task_id,
        user_id="alice",
        data=TaskSubmittedData(request_id="r", status_url=evil, response_url=evil, cancel_url=evil),
    )


def forged_stored(task_id: str) -> ImagesStored:
    image = StoredImage(
        url="https://attacker.example/x.jpg",
        key="x.jpg",
        content_type="image/jpeg",
        width=1,
        height=1,
        size=1,
    )
    return ImagesStored(task_id=task_id, user_id="alice", data=ImagesStoredData(images=(image,)))


async def try_publish(bus: Bus, event: object) -> bool:
    """Whether the stream acknowledged ``event`` (a refused publish is never answered)."""
    try:
        await bus.js.publish(
            event.subject(bus.prefix),  # type: ignore[attr-defined]
            encode_event(event),  # type: ignore[arg-type]
            stream=bus.stream,
            timeout=1,
        )
    except (nats.errors.Error, TimeoutError):
        return False
    return True


async def stored_tokens(operator: Bus, task_id: str) -> list[str]:
    return [e.token for _, e in await operator.task_story(task_id)]


async def test_a_service_cannot_forge_another_services_events(secured, operator):
    gateway = await Bus.connect(as_user(secured, "gateway"), "gateway")
    poller = await Bus.connect(as_user(secured, "poller"), "poller")
    uploader = await Bus.connect(as_user(secured, "uploader"), "uploader")
    try:
        assert await try_publish(gateway, requested("t1"))
        assert not await try_publish(gateway, forged_submitted("t1"))
        assert not await try_publish(gateway, forged_stored("t1"))
        assert not await try_publish(poller, forged_stored("t1"))
        assert not await try_publish(uploader, forged_submitted("t1"))
        assert not await try_publish(uploader, requested("t2", user="victim"))
        assert await try_publish(uploader, forged_stored("t1"))  # its own event type
        assert await stored_tokens(operator, "t1") == ["requested", "stored"]
        assert await stored_tokens(operator, "t2") == []
    finally:
        for bus in (gateway, poller, uploader):
            await bus.close()


async def test_wrong_or_missing_credentials_fail_at_once_with_a_clear_message(secured):
    with pytest.raises(NatsCredentialsRejected, match="refused the credentials of gateway"):
        await Bus.connect(as_user(secured, "gateway", password="wrong-password"), "gateway")
    with pytest.raises(NatsCredentialsRejected, match="NATS_USER=.unset."):
        await Bus.connect(Settings(NATS_URL=secured[0]), "gateway")
    with pytest.raises(NatsCredentialsRejected):
        await Bus.connect(Settings(NATS_URL=secured[0]), "cli", ensure=False, reconnect=False)


async def test_each_service_can_do_its_own_job(secured, operator):
    """What each service's code does on NATS, done with that service's own user."""
    gateway = await Bus.connect(as_user(secured, "gateway"), "gateway")
    await gateway.publish(requested("t3"))
    assert isinstance(await gateway.last_event("t3", "requested"), TaskRequested)
    follow = gateway.follow_story("t3")
    assert (await anext(follow))[1].token == "requested"
    await follow.aclose()

    submitter = await Bus.connect(as_user(secured, "submitter"), "submitter")
    consumer = Consumer(durable="submitter", token="requested")
    await consumer.ensure(submitter)
    await consumer.ensure(submitter)  # a restart re-applies its consumer
    sub = await submitter.js.pull_subscribe_bind(durable="submitter", stream=submitter.stream)
    [msg] = await sub.fetch(1, timeout=5)
    await msg.in_progress()
    waiting = asyncio.create_task(submitter.wait_for_any("t3", ("submitted",)))
    submitted = TaskSubmitted(
        task_id="t3",
        user_id="alice",
        data=TaskSubmittedData(request_id="r", status_url="u", response_url="u", cancel_url="u"),
    )
    await submitter.publish(submitted)
    assert await asyncio.wait_for(waiting, 10)
    await msg.ack_sync()
    await submitter.dead_letter("submitter", msg.subject, 1, msg.data, "test")

    projector = await Bus.connect(as_user(secured, "projector"), "projector")
    psub = await projector.js.subscribe(
        projector.events_subject(), stream=projector.stream, ordered_consumer=True
    )
    seen = [(await psub.next_msg(timeout=5)).subject for _ in range(3)]
    assert seen == ["flux.task.t3.requested", "flux.task.t3.submitted", "flux.dlq.submitter"]
    await psub.unsubscribe()
    await projector.dead_letter("projector", "flux.task.t3.requested", 1, b"{}", "cannot be projected: test")
    for bus in (gateway, submitter, projector):
        await bus.close()


async def test_a_service_start_never_rewrites_the_streams_settings(secured, operator):
    info = await operator.js.stream_info(operator.stream)
    assert info.config.max_age in (None, 0) and info.config.retention == "limits"
    info.config.max_age = 90 * 24 * 3600.0  # the operator's retention decision
    info.config.max_bytes = 10**9
    await operator.js.update_stream(info.config)
    for service in SERVICES:
        bus = await Bus.connect(as_user(secured, service), service)
        await bus.close()
    after = (await operator.js.stream_info(operator.stream)).config
    assert (after.max_age, after.max_bytes) == (90 * 24 * 3600.0, 10**9)


async def test_a_stream_that_cannot_carry_the_log_stops_the_service(secured, operator):
    info = await operator.js.stream_info(operator.stream)
    info.config.subjects = ["flux.task.>"]
    await operator.js.update_stream(info.config)
    with pytest.raises(RuntimeError, match="does not capture 'flux.>'"):
        await Bus.connect(as_user(secured, "gateway"), "gateway")


async def test_a_new_stream_gets_the_configured_retention(nats_url, settings):
    limited = settings.model_copy(update={"stream_max_age_seconds": 3600.0, "stream_max_bytes": 10**8})
    bus = await Bus.connect(limited, "test")
    try:
        config = (await bus.js.stream_info(bus.stream)).config
        assert (config.max_age, config.max_bytes, config.discard) == (3600.0, 10**8, "old")
    finally:
        await bus.js.delete_stream(bus.stream)
        await bus.close()


def test_passwords_are_kept_across_restarts_and_private(tmp_path):
    first = load_or_create_users(tmp_path)
    assert load_or_create_users(tmp_path) == first
    assert set(first) == {*SERVICES, OPERATOR} and len(set(first.values())) == len(first)
    assert (tmp_path / "nats-users.json").stat().st_mode & 0o077 == 0


def test_compose_uses_the_generated_server_config_and_nats_accepts_it(tmp_path):
    committed = (ROOT / "deploy" / "nats-server.conf").read_text()
    assert committed == compose_config()
    conf = tmp_path / "nats.conf"
    conf.write_text(committed.replace('"/data"', f'"{tmp_path}"'))
    env = {**os.environ, **{f"NATS_{u.upper()}_PASSWORD": f"pw-{u}" for u in (*SERVICES, OPERATOR)}}
    checked = subprocess.run(
        [nats_server_binary(), "-t", "-c", str(conf)], env=env, capture_output=True, text=True, timeout=20
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    compose = (ROOT / "compose.yaml").read_text()
    assert "deploy/nats-server.conf" in compose
    for service in SERVICES:
        assert f"NATS_{service.upper()}_PASSWORD" in compose


@pytest.mark.parametrize("service", ["submitter", "projector"])
def test_a_service_with_wrong_credentials_exits_saying_so(secured, service):
    env = {
        "PATH": "/usr/bin:/bin",
        "NATS_URL": secured[0],
        "NATS_USER": service,
        "NATS_PASSWORD": "not-the-password",
        "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none",
    }
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "run", service],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"fluxpipe: NATS at {secured[0]} refused the credentials of {service} "
        f"(NATS_USER={service}): check NATS_USER / NATS_PASSWORD"
    )
