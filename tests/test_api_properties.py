"""Property-based tests of every route (schemathesis over the OpenAPI schema the gateway
publishes), against ``fluxpipe up``: whatever valid or invalid input hypothesis makes up, no
answer is a 5xx, and every documented answer matches its schema and content type."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from tests.test_e2e import Stack

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(
        tmp_path_factory.mktemp("fluxpipe-props"),
        extra_env={"FLUXPIPE_SIM_QUEUE_SECONDS": "0.05", "FLUXPIPE_SIM_RUN_SECONDS": "0.05"},
    )
    yield stack
    if stack.proc.poll() is None:
        stack.stop()


CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]


def test_no_route_answers_a_5xx_and_answers_match_the_schema(stack: Stack) -> None:
    api = schemathesis.openapi.from_url(f"{stack.url}/openapi.json")
    failures: dict[str, str] = {}
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 5

    for operation, mode in itertools.product(operations, GenerationMode):

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def check(case) -> None:  # noqa: ANN001 - a schemathesis Case
            case.call_and_validate(base_url=stack.url, headers=stack.auth, checks=CHECKS, timeout=30)

        try:
            check()
        except (Exception, BaseExceptionGroup) as exc:  # every operation is tried; all reported together
            failures[f"{operation.label} ({mode.value})"] = str(exc)[:2000]
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
