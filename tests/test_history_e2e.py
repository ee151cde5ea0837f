"""The unified history and live progress as a user meets them: one ``fluxpipe up``, over HTTP.

Server-sent events follow a task to its end and resume after a reconnect; Midjourney and
Jimeng items ingested (``fluxpipe ingest``) and imported from an Open WebUI database
(``fluxpipe import-openwebui``) show up beside Flux items with their tags and filters; cursor
paging neither skips nor repeats while items arrive; hiding is per user.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from services.common.settings import Settings
from tests.conftest import _with_database
from tests.test_e2e import Stack, follow

pytestmark = pytest.mark.timeout(240)

BASE = datetime(2025, 3, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("fluxpipe-history"))
    yield stack
    if stack.proc.poll() is None:
        stack.stop()


def sse(response: httpx.Response) -> Iterator[dict[str, str]]:
    """The server-sent events of a streaming response, as {field: value} (comments skipped)."""
    event: dict[str, str] = {}
    for line in response.iter_lines():
        if not line:
            if event:
                yield event
            event = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            event[name] = event.get(name, "") + value.removeprefix(" ")


def eventually(check: Callable[[], Any], timeout: float = 30) -> Any:
    """Poll ``check`` until it returns something truthy; fail with its last answer otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"condition never held; last answer: {result!r}"
        time.sleep(0.1)


def bearer(stack: Stack, user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.cli('token', '--user', user).strip()}"}


def ingest(stack: Stack, tmp_path: Path, items: list[dict[str, Any]]) -> str:
    path = tmp_path / f"items-{uuid.uuid4().hex[:6]}.jsonl"
    path.write_text("\n".join(json.dumps(item, default=str) for item in items) + "\n")
    return stack.cli("ingest", str(path))


def item(source: str, n: int, word: str, user: str = "dev", **extra: Any) -> dict[str, Any]:
    """An item whose prompt starts with ``word``: each test filters on its own word."""
    return {
        "source": source,
        "id": f"{source[:2]}-{n}",
        "user_id": user,
        "prompt": f"{word} {source} picture {n}",
        "image_url": f"https://cdn.example/{source}/{n}.png",
        "created_at": (BASE + timedelta(minutes=n)).isoformat(),
        **extra,
    }


def cli_result(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args, "--data-dir", str(stack.data_dir)],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def unified(client: httpx.Client, **params: Any) -> dict[str, Any]:
    r = client.get("/api/flux/unified-history", params=params)
    assert r.status_code == 200, r.text
    return r.json()


def test_sse_follows_a_task_to_its_end_and_resumes_after_a_reconnect(stack: Stack) -> None:
    with httpx.Client(base_url=stack.url, headers=stack.auth, timeout=30) as client:
        task_id = client.post("/api/flux/text-to-image", json={"prompt": "a kite over dunes"}).json()[
            "task_id"
        ]
        url = f"/api/flux/task/{task_id}/events"
        with client.stream("GET", url) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            first = []
            for event in sse(r):
                first.append(event)
                if len(first) == 2:
                    break  # the client goes away mid-story
        assert [e["event"] for e in first] == ["task.requested", "task.submitted"]

        with client.stream("GET", url, headers={"Last-Event-ID": first[-1]["id"]}) as r:
            assert r.status_code == 200
            rest = list(sse(r))  # ends by itself once the story is complete
        assert [e["event"] for e in rest[-2:]] == ["task.completed", "task.images_stored"]

        seen = [int(e["id"]) for e in first + rest]
        story = [json.loads(line) for line in stack.cli("events", task_id, "--json").splitlines()]
        assert seen == [e["seq"] for e in story]  # no gap, no repeat, stream order
        assert all(json.loads(e["data"])["task_id"] == task_id for e in first + rest)

        with client.stream("GET", url) as r:  # from the start again: the whole story, then the end
            assert [int(e["id"]) for e in sse(r)] == seen
        done = client.get(url, headers={"Last-Event-ID": str(seen[-1])})
        assert done.status_code == 204  # tells an EventSource the story is over

        bad = client.get(url, headers={"Last-Event-ID": "abc"})
        assert bad.status_code == 422 and "Last-Event-ID" in bad.json()["message"]
    with httpx.Client(base_url=stack.url, headers=bearer(stack, "bob"), timeout=10) as bob:
        r = bob.get(url)
        assert r.status_code == 404 and task_id in r.json()["message"]


def test_the_users_feed_streams_changes_of_their_tasks_only(stack: Stack) -> None:
    bob = bearer(stack, "bob")
    with (
        httpx.Client(base_url=stack.url, headers=stack.auth, timeout=30) as client,
        client.stream("GET", "/api/flux/events") as feed,
    ):
        events = sse(feed)
        assert next(events)["event"] == "ready"
        mine = [client.post("/api/flux/text-to-image", json={"prompt": f"feed {n}"}).json() for n in range(2)]
        client.post("/api/flux/text-to-image", json={"prompt": "bob's own"}, headers=bob)
        ids = {t["task_id"] for t in mine}
        stored: set[str] = set()
        received, seqs = [], []
        for event in events:
            received.append(json.loads(event["data"]))
            seqs.append(int(event["id"]))
            if event["event"] == "task.images_stored":
                stored.add(received[-1]["task_id"])
            if stored == ids:
                break
    assert {e["task_id"] for e in received} == ids and {e["user_id"] for e in received} == {"dev"}
    assert seqs == sorted(set(seqs))  # stream order, each change once

    with (
        httpx.Client(base_url=stack.url, headers=stack.auth, timeout=30) as client,
        client.stream("GET", "/api/flux/events", headers={"Last-Event-ID": str(seqs[0])}) as feed,
    ):
        events = sse(feed)
        assert next(events)["event"] == "ready"
        assert int(next(events)["id"]) == seqs[1]  # resumed right after the last one seen
    assert {e["type"] for e in received} >= {"task.requested", "task.completed", "task.images_stored"}


def test_ingested_items_show_up_with_their_tags_and_filters(stack: Stack, tmp_path: Path) -> None:
    w = "ingested"
    items = [item("midjourney", n, w) for n in range(1, 4)] + [
        item("jimeng", n, w, model="doubao-seedream-3-0-t2i") for n in range(4, 6)
    ]
    items.append(item("jimeng", 6, w, status="FAILED"))
    items.append(item("midjourney", 7, w, user="bob"))
    assert ingest(stack, tmp_path, items).strip() == "ingest: 7 recorded"
    assert ingest(stack, tmp_path, items).strip() == "ingest: 7 unchanged"  # re-running changes nothing

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(item("midjourney", 9, w)) + "\n" + json.dumps({"source": "dalle"}) + "\n")
    r = cli_result(stack, "ingest", str(bad))
    assert r.returncode == 2 and "line 2: source: Input should be 'midjourney' or 'jimeng'" in r.stderr

    with httpx.Client(base_url=stack.url, headers=stack.auth, timeout=10) as client:
        task_id = client.post("/api/flux/text-to-image", json={"prompt": "ingested flux lighthouse"}).json()[
            "task_id"
        ]
        follow(client, task_id, {"SUCCESS"})
        page = eventually(
            lambda: (
                (p := unified(client, q=w, limit=100))
                and {"midjourney", "jimeng", "flux"} <= {i["source"] for i in p["items"]}
                and p
            )
        )
        by_id = {i["id"]: i for i in page["items"]}
        assert by_id["midjourney:mi-1"]["tag"] == "Midjourney"
        assert (
            by_id["jimeng:ji-4"]["tag"] == "Jimeng"
            and by_id["jimeng:ji-4"]["model"] == "doubao-seedream-3-0-t2i"
        )
        flux = by_id[f"flux:{task_id}"]
        assert flux["tag"] == "FLUX.1 Dev" and flux["prompt"] == "ingested flux lighthouse"
        assert (
            flux["image_url"].startswith(f"{stack.url}/files/")
            and flux["provider_image_url"] != flux["image_url"]
        )
        assert "midjourney:mi-7" not in by_id and "jimeng:ji-6" not in by_id  # bob's; not a success
        created = [i["created_at"] for i in page["items"]]
        assert created == sorted(created, reverse=True)

        assert {i["id"] for i in unified(client, q=w, source="jimeng")["items"]} == {
            "jimeng:ji-4",
            "jimeng:ji-5",
        }
        assert [i["id"] for i in unified(client, q=w, status="FAILED")["items"]] == ["jimeng:ji-6"]
        assert [i["id"] for i in unified(client, q=w, model="fal-ai/flux-1/dev")["items"]] == [
            f"flux:{task_id}"
        ]
        assert [i["id"] for i in unified(client, q="INGESTED MIDJOURNEY PICTURE 2")["items"]] == [
            "midjourney:mi-2"
        ]
        window = unified(
            client,
            q=w,
            since=(BASE + timedelta(minutes=2)).isoformat(),
            until=(BASE + timedelta(minutes=4)).isoformat(),
        )
        assert [i["id"] for i in window["items"]] == ["midjourney:mi-3", "midjourney:mi-2"]
        assert [i["id"] for i in unified(client, q=w, page=2, limit=2, source="midjourney")["items"]] == [
            "midjourney:mi-1"
        ]
        r = client.get("/api/flux/unified-history", params={"source": "dalle"})
        assert r.status_code == 422 and "source" in r.json()["message"]
        r = client.get("/api/flux/unified-history", params={"cursor": "not-ours"})
        assert r.status_code == 422 and r.json()["message"] == "cursor: not a cursor this server issued"
        r = client.get("/api/flux/unified-history", params={"since": "2025-03-01T00:00:00"})
        assert r.status_code == 422 and r.json()["message"].startswith("since: give a time zone")
        cursor = unified(client, q=w, limit=1)["next_cursor"]
        r = client.get("/api/flux/unified-history", params={"cursor": cursor, "page": 2})
        assert r.status_code == 422 and "page and cursor" in r.json()["message"]


OPEN_WEBUI_TABLES = """
CREATE TABLE mj_tasks (
    id VARCHAR(50) PRIMARY KEY, user_id VARCHAR(50) NOT NULL, action VARCHAR(50),
    status VARCHAR(50) DEFAULT 'SUBMITTED', prompt TEXT, prompt_en TEXT, description TEXT,
    mode VARCHAR(50) DEFAULT 'fast', credits_cost INTEGER DEFAULT 0, submit_time TIMESTAMP,
    start_time TIMESTAMP, finish_time TIMESTAMP, progress VARCHAR(20) DEFAULT '0%', image_url TEXT,
    cloud_image_url TEXT, fail_reason TEXT, properties JSON, buttons JSON, parent_task_id VARCHAR(50),
    created_at TIMESTAMP DEFAULT now(), updated_at TIMESTAMP NOT NULL DEFAULT now()
);
CREATE TABLE dreamwork_tasks (
    id VARCHAR(50) PRIMARY KEY, user_id VARCHAR(50) NOT NULL, action VARCHAR(50),
    status VARCHAR(50) DEFAULT 'SUBMITTED', prompt TEXT, model VARCHAR(100),
    size VARCHAR(50) DEFAULT '1024x1024', guidance_scale FLOAT, seed INTEGER, watermark BOOLEAN DEFAULT true,
    credits_cost INTEGER DEFAULT 0, submit_time TIMESTAMP, start_time TIMESTAMP, finish_time TIMESTAMP,
    progress VARCHAR(20) DEFAULT '0%', image_url TEXT, cloud_image_url TEXT, fail_reason TEXT,
    input_image TEXT, properties JSON, created_at TIMESTAMP DEFAULT now(),
    updated_at TIMESTAMP NOT NULL DEFAULT now()
);
"""


@pytest.fixture
async def openwebui_db(pg_server_url: str) -> Any:
    """A scratch database holding Open WebUI's mj_tasks and dreamwork_tasks, with a few rows."""
    name = f"openwebui_{uuid.uuid4().hex[:10]}"
    admin = Settings(DATABASE_URL=pg_server_url).asyncpg_dsn
    conn = await asyncpg.connect(admin)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    url = Settings(DATABASE_URL=_with_database(pg_server_url, name)).asyncpg_dsn
    db = await asyncpg.connect(url)
    await db.execute(OPEN_WEBUI_TABLES)
    t = datetime(2024, 12, 24, 18, 0)
    await db.executemany(
        "INSERT INTO mj_tasks (id, user_id, action, status, prompt, image_url, cloud_image_url, created_at)"
        " VALUES ($1, $2, 'IMAGINE', $3, $4, $5, $6, $7)",
        [
            ("1734000000001", "dev", "SUCCESS", "owui cat", "https://mj.example/1.png", None, t),
            (
                "1734000000002",
                "dev",
                "SUCCESS",
                "owui dog",
                "https://mj.example/2.png",
                "https://cos.example/2.png",
                t + timedelta(minutes=1),
            ),
            ("1734000000003", "dev", "FAILURE", "owui fail", None, None, t + timedelta(minutes=2)),
            ("1734000000004", "carol", "SUCCESS", "owui carol", "https://mj.example/4.png", None, t),
        ],
    )
    await db.executemany(
        "INSERT INTO dreamwork_tasks (id, user_id, action, status, prompt, model, image_url, created_at)"
        " VALUES ($1, $2, 'TEXT_TO_IMAGE', $3, $4, $5, $6, $7)",
        [
            (
                "dw-a",
                "dev",
                "SUCCESS",
                "owui dream",
                "doubao-seedream-3-0-t2i-250415",
                "https://dw.example/a.png",
                t + timedelta(minutes=3),
            ),
            (
                "dw-b",
                "dev",
                "SUBMITTED",
                "owui pending",
                "doubao-seedream-3-0-t2i-250415",
                None,
                t + timedelta(minutes=4),
            ),
        ],
    )
    await db.close()
    yield url
    conn = await asyncpg.connect(admin)
    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await conn.close()


def test_open_webui_rows_are_imported_once(stack: Stack, openwebui_db: str) -> None:
    out = stack.cli("import-openwebui", "--database-url", openwebui_db)
    assert out.splitlines() == ["midjourney: 3 recorded, 1 skipped", "jimeng: 1 recorded, 1 skipped"]
    again = stack.cli("import-openwebui", "--database-url", openwebui_db)
    assert again.splitlines() == ["midjourney: 1 skipped, 3 unchanged", "jimeng: 1 skipped, 1 unchanged"]

    with httpx.Client(base_url=stack.url, headers=stack.auth, timeout=10) as client:
        found = eventually(lambda: unified(client, q="owui")["items"])
        assert [(i["id"], i["tag"], i["image_url"]) for i in found] == [
            ("jimeng:dw-a", "Jimeng", "https://dw.example/a.png"),
            ("midjourney:1734000000002", "Midjourney", "https://cos.example/2.png"),  # ours first
            ("midjourney:1734000000001", "Midjourney", "https://mj.example/1.png"),
        ]
        assert found[1]["provider_image_url"] == "https://mj.example/2.png"
        assert found[2]["created_at"].startswith("2024-12-24T18:00:00")  # naive times are UTC
        assert [i["model"] for i in unified(client, q="owui", source="jimeng")["items"]] == [
            "doubao-seedream-3-0-t2i-250415"
        ]


def test_cursor_paging_neither_skips_nor_repeats_while_items_arrive(stack: Stack, tmp_path: Path) -> None:
    w = "paging"
    first = [item("midjourney", 100 + n, w, id=f"page-{n}") for n in range(25)]
    ingest(stack, tmp_path, first)
    with httpx.Client(base_url=stack.url, headers=stack.auth, timeout=10) as client:
        eventually(lambda: len(unified(client, q=w, limit=100)["items"]) == 25)
        params = {"source": "midjourney", "limit": 10, "q": w}
        pages = [unified(client, **params)]
        newer = [item("midjourney", 500 + n, w, id=f"new-{n}") for n in range(5)]
        older = [item("midjourney", 10 + n, w, id=f"old-{n}") for n in range(5)]
        ingest(stack, tmp_path, newer + older)
        eventually(lambda: len(unified(client, q=w, limit=100)["items"]) == 35)
        while cursor := pages[-1]["next_cursor"]:
            pages.append(unified(client, **params, cursor=cursor))
    seen = [i["id"] for page in pages for i in page["items"]]
    assert len(seen) == len(set(seen))  # no repeats
    expected = {f"midjourney:page-{n}" for n in range(25)} | {f"midjourney:old-{n}" for n in range(5)}
    assert set(seen) == expected  # nothing skipped; the newer ones belong before the first page
    keys = [(i["created_at"], i["id"]) for page in pages for i in page["items"]]
    assert keys == sorted(keys, reverse=True)
    assert pages[0]["page"] == 1 and pages[1]["page"] is None


def test_hiding_an_item_is_per_user(stack: Stack, tmp_path: Path) -> None:
    w = "hiding"
    ingest(
        stack, tmp_path, [item("jimeng", 900, w, id="hide-me"), item("jimeng", 901, w, id="bobs", user="bob")]
    )
    bob = bearer(stack, "bob")
    with (
        httpx.Client(base_url=stack.url, headers=stack.auth, timeout=10) as alice,
        httpx.Client(base_url=stack.url, headers=bob, timeout=10) as bobs,
    ):
        eventually(
            lambda: unified(alice, q="picture 900")["items"] and unified(bobs, q="picture 901")["items"]
        )
        r = bobs.delete("/api/flux/unified-history/jimeng:hide-me")
        assert r.status_code == 404 and "jimeng:hide-me" in r.json()["message"]
        assert alice.post("/api/flux/unified-history/jimeng:bobs/hide").status_code == 404
        assert alice.delete("/api/flux/unified-history/nope").status_code == 404

        r = alice.delete("/api/flux/unified-history/jimeng:hide-me")
        assert r.status_code == 202 and r.json() == {"id": "jimeng:hide-me", "hidden": True}
        eventually(lambda: not unified(alice, q="picture 900")["items"])
        assert [i["id"] for i in unified(bobs, q="picture 901")["items"]] == ["jimeng:bobs"]

        assert bobs.post("/api/flux/unified-history/jimeng:bobs/hide").status_code == 202
        eventually(lambda: not unified(bobs, q="picture 901")["items"])
    # A changed record of the item never brings it back. The marker is published after it, and
    # the projector applies the log in order: once the marker shows, the record was applied.
    ingest(stack, tmp_path, [item("jimeng", 900, w, id="hide-me", model="changed")])
    ingest(stack, tmp_path, [item("jimeng", 902, w, id="marker")])
    with httpx.Client(base_url=stack.url, headers=stack.auth, timeout=10) as alice:
        eventually(lambda: unified(alice, q="picture 902")["items"])
        assert unified(alice, q=w)["items"] == unified(alice, q="picture 902")["items"]
