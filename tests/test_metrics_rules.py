"""The Prometheus rules file only names metrics fluxpipe really exports."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import REGISTRY

import services.common.metrics  # noqa: F401  (registers every fluxpipe metric)

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
