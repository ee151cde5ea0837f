"""Metrics: the projector's position and lag, and a rules file that only names metrics
fluxpipe really exports."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

from prometheus_client import REGISTRY

from services.common.metrics import projector_position
from services.projector.main import project
from tests.test_replay import caught_up, task_story


def value(name: str) -> float:
    found = REGISTRY.get_sample_value(name)
    return found if found is not None else 0.0


RULES = Path(__file__).resolve().parent.parent / "docs" / "prometheus-rules.yml"


def exported() -> set[str]:
    names: set[str] = set()
    for family in REGISTRY.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        if family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_count", "_sum"))
        if family.type == "counter":
            names.add(family.name + "_total")
    return names


def test_every_metric_in_the_rules_is_exported() -> None:
    used = set(re.findall(r"\bfluxpipe_[a-z_]+", RULES.read_text()))
    assert used, "the rules file names no metric"
    assert used - exported() == set()


def test_projector_lag_is_the_age_of_the_oldest_unapplied_event() -> None:
    projector_position(10, 15, datetime.now(UTC) - timedelta(seconds=90))
    assert value("fluxpipe_projector_lag_events") == 5
    assert 89 <= value("fluxpipe_projector_lag_seconds") < 120
    projector_position(15, 15)
    assert (value("fluxpipe_projector_lag_events"), value("fluxpipe_projector_lag_seconds")) == (0, 0)


async def test_the_projectors_counters_move_with_the_events_it_applies(bus, engine) -> None:
    applied = value("fluxpipe_projector_events_applied_total")
    for event in task_story("m1", "stored"):
        await bus.publish(event)
    stop = asyncio.Event()
    projector = asyncio.create_task(project(bus, engine, stop))
    try:
        await caught_up(bus, engine)
    finally:
        stop.set()
        await projector
    last_seq = (await bus.js.stream_info(bus.stream)).state.last_seq
    assert value("fluxpipe_projector_events_applied_total") == applied + 5
    assert value("fluxpipe_projector_checkpoint") == last_seq
    assert value("fluxpipe_projector_lag_events") == 0
