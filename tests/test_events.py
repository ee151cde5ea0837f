"""The event contract: every event round-trips, unknown ones are refused with a reason."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from schemas.events import (
    ImagesStored,
    ImagesStoredData,
    ProviderImage,
    StorageFailed,
    StorageFailedData,
    StoredImage,
    TaskCancelled,
    TaskCancelledData,
    TaskCompleted,
    TaskCompletedData,
    TaskFailed,
    TaskFailedData,
    TaskRequested,
    TaskRequestedData,
    TaskStatusChanged,
    TaskStatusChangedData,
    TaskSubmitted,
    TaskSubmittedData,
    UnknownEvent,
    decode_event,
    encode_event,
)

IDS = {"task_id": "t1", "user_id": "alice"}
SAMPLES = [
    TaskRequested(
        **IDS, data=TaskRequestedData(model="fal-ai/flux-1/dev", task_type="text_to_image", prompt="p")
    ),
    TaskSubmitted(
        **IDS, data=TaskSubmittedData(request_id="r", status_url="s", response_url="r", cancel_url="c")
    ),
    TaskStatusChanged(**IDS, data=TaskStatusChangedData(status="IN_PROGRESS", seq=2)),
    TaskCompleted(**IDS, data=TaskCompletedData(request_id="r", images=(ProviderImage(url="u"),))),
    TaskFailed(**IDS, data=TaskFailedData(stage="result", error="boom")),
    ImagesStored(
        **IDS,
        data=ImagesStoredData(
            images=(StoredImage(url="u", key="k", content_type="image/png", width=1, height=1, size=3),)
        ),
    ),
    StorageFailed(**IDS, data=StorageFailedData(error="disk full")),
    TaskCancelled(**IDS, data=TaskCancelledData()),
]


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: e.type)
def test_every_event_round_trips_through_json(event):
    assert decode_event(encode_event(event)) == event


def test_subjects_carry_the_task_and_msg_ids_are_deterministic():
    requested, status = SAMPLES[0], SAMPLES[2]
    assert requested.subject("flux") == "flux.task.t1.requested"
    assert requested.msg_id == "t1.requested"
    assert status.subject("flux") == "flux.task.t1.status"
    assert status.msg_id == "t1.status.2"
    assert len({type(e).token for e in SAMPLES}) == len(SAMPLES)


def test_unknown_type_is_refused_with_the_reason():
    raw = json.dumps({"type": "task.exploded", "task_id": "t", "user_id": "u", "data": {}})
    with pytest.raises(UnknownEvent, match="task.exploded"):
        decode_event(raw)


def test_unknown_version_is_refused():
    payload = json.loads(encode_event(SAMPLES[0]))
    payload["version"] = 7
    with pytest.raises(UnknownEvent, match="version 7"):
        decode_event(json.dumps(payload))


def test_malformed_payload_names_the_field():
    payload = json.loads(encode_event(SAMPLES[0]))
    del payload["data"]["model"]
    with pytest.raises(UnknownEvent, match="model"):
        decode_event(json.dumps(payload))


def test_events_are_frozen():
    with pytest.raises(ValidationError, match="frozen"):
        SAMPLES[0].task_id = "other"  # type: ignore[misc]
