"""A local COS (services/cossim) on a real loopback port, and the settings that point at it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from services.cossim.app import CosSimulator, Credential
from tests.simulator_server import serve

BUCKET = "fluxpipe-test-1250000000"
REGION = "ap-guangzhou"
SECRET_ID = "AKIDfluxpipeTEST0123456789abcdef"
SECRET_KEY = "cos-secret-key-0123456789abcdefXYZ"


@dataclass
class RunningCos:
    sim: CosSimulator
    url: str

    def env(self, **overrides: str) -> dict[str, str]:
        """The environment of a fluxpipe process storing in this bucket."""
        env = {
            "FLUXPIPE_STORAGE": "cos",
            "COS_BUCKET": BUCKET,
            "COS_REGION": REGION,
            "COS_SECRET_ID": SECRET_ID,
            "COS_SECRET_KEY": SECRET_KEY,
            "COS_SCHEME": "http",
            "COS_DOMAIN": self.url.removeprefix("http://"),
            "COS_PUBLIC_READ": "true" if self.sim.public_read else "false",
            "COS_TIMEOUT": "2",
            "COS_RETRY_ATTEMPTS": "4",
        }
        env.update(overrides)
        return env


@contextmanager
def running_cos(*, public_read: bool = False, token: str | None = None) -> Iterator[RunningCos]:
    sim = CosSimulator(
        bucket=BUCKET,
        region=REGION,
        credentials={SECRET_ID: Credential(SECRET_KEY, token)},
        public_read=public_read,
    )
    with serve(lambda base_url: sim.app()) as url:
        yield RunningCos(sim, url)
