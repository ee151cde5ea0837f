"""compose.yaml and the Dockerfile, checked without a container engine (none runs here): the
deployment's shape, no secret in the file, and every command a container runs is one
``fluxpipe`` accepts with exactly those arguments."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer.main
import yaml

from services.cli import WORKERS
from services.cli import app as cli

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
FLUXPIPE = {name: s for name, s in SERVICES.items() if s.get("build")}
SECRET_WORDS = re.compile(r"PASSWORD|SECRET|KEY|TOKEN", re.I)


def parses(args: list[str]) -> None:
    """Parse ``fluxpipe <args>`` as the CLI would, down to the subcommand, without running it
    (typer's click: a group has ``resolve_command``; what follows its options is in
    ``_protected_args`` and ``args``)."""
    command = typer.main.get_command(cli)
    ctx = command.make_context("fluxpipe", list(args))
    depth = 0
    while hasattr(command, "resolve_command"):
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        name, sub, rest = command.resolve_command(ctx, rest)
        assert sub is not None, f"fluxpipe has no command {name!r}"
        ctx = sub.make_context(name or "", rest, parent=ctx)
        command = sub
        depth += 1
    assert depth >= 1, "the arguments never reached a subcommand"


def test_every_worker_runs_twice_and_the_stack_is_complete() -> None:
    assert {"nats", "postgres", "migrate", "gateway"} <= SERVICES.keys()
    for worker in WORKERS:
        service = SERVICES[worker.value]
        assert service["command"] == ["run", worker.value]
        assert service["deploy"]["replicas"] == 2, worker
        assert service["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert SERVICES["migrate"]["command"] == ["migrate"]
    assert SERVICES["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_health_checks_and_volumes() -> None:
    for name in ("nats", "postgres", "gateway", *(w.value for w in WORKERS)):
        assert SERVICES[name].get("healthcheck", {}).get("test"), f"{name} has no health check"
    assert "nats-data:/data" in SERVICES["nats"]["volumes"]
    assert "pg-data:/var/lib/postgresql/data" in SERVICES["postgres"]["volumes"]
    assert (
        "storage:/storage" in SERVICES["gateway"]["volumes"]
        and "storage:/storage" in SERVICES["uploader"]["volumes"]
    )


@pytest.mark.parametrize("name", sorted(FLUXPIPE))
def test_each_command_exists_in_the_cli_with_those_arguments(name: str) -> None:
    parses(FLUXPIPE[name]["command"])


def test_the_cli_check_itself_refuses_what_does_not_exist() -> None:
    for wrong in (["run", "gateway", "--colour", "blue"], ["run", "teapot"], ["serve"], ["migrate", "now"]):
        refused = r"No such|no command|is not one of|unexpected extra|Got unexpected"
        with pytest.raises(Exception, match=refused):
            parses(wrong)


def test_no_secret_is_written_in_the_file() -> None:
    def walk(value: object, where: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, str | int) and SECRET_WORDS.search(str(key)):
                    assert str(item).startswith("${") and str(item).endswith("}"), f"{where}.{key} = {item!r}"
                walk(item, f"{where}.{key}")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, f"{where}[{i}]")

    walk(COMPOSE, "compose")
    assert "postgresql://fluxpipe:${POSTGRES_PASSWORD" in (ROOT / "compose.yaml").read_text()


def test_the_image_runs_as_a_non_root_user() -> None:
    lines = [line.split() for line in (ROOT / "Dockerfile").read_text().splitlines() if line.strip()]
    users = [words[1] for words in lines if words[0] == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert lines[-1][0] == "ENTRYPOINT" and "fluxpipe" in " ".join(lines[-1])
