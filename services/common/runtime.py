"""Process plumbing every service shares: logging that cannot leak secrets, and clean stops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable

from services.common.settings import Settings


class RedactingFormatter(logging.Formatter):
    """Defence in depth: any configured secret in a formatted record, message or traceback,
    is replaced with ``***``."""

    def __init__(self, fmt: str, secrets: list[str]) -> None:
        super().__init__(fmt)
        self.secrets = [s for s in secrets if len(s) >= 6]

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


def setup_logging(settings: Settings, service: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(
        RedactingFormatter(
            f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s",
            [
                settings.fal_key.get_secret_value(),
                settings.jwt_secret.get_secret_value(),
                settings.idempotency_secret.get_secret_value(),
                settings.nats_password.get_secret_value(),
                settings.webui_secret_key.get_secret_value(),
                settings.webui_forwarded_jwt_secret.get_secret_value(),
                settings.config_key.get_secret_value(),
                settings.cos_secret_key.get_secret_value(),
                settings.cos_token.get_secret_value(),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("qcloud_cos").setLevel(logging.WARNING)  # it logs request headers and signatures


STOP_DEADLINE = 60.0  # longer than any service's own grace (a submit in flight gets 35 s)


async def run_until_signalled(
    start: Callable[[asyncio.Event], Awaitable[None]], ready: asyncio.Event | None = None
) -> None:
    """Run ``start(stop_event)``; SIGINT/SIGTERM set the event so the service can finish cleanly.

    A stop always ends the process: if the service has not set ``ready`` yet (it is still
    reaching NATS, say, which it retries forever), it has nothing to finish and is cancelled
    at once; otherwise it gets ``STOP_DEADLINE`` seconds to finish on its own, and a second
    signal cancels it at once. A service never outlives its supervisor for want of a server.
    """
    stop, again = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def signalled() -> None:
        (again if stop.is_set() else stop).set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, signalled)
    main = asyncio.ensure_future(start(stop))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({main, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not main.done() and (ready is None or ready.is_set()):
        hurry = asyncio.ensure_future(again.wait())
        await asyncio.wait({main, hurry}, timeout=STOP_DEADLINE, return_when=asyncio.FIRST_COMPLETED)
        hurry.cancel()
    stopping.cancel()
    if not main.done():
        logging.getLogger(__name__).warning("stopping now, without waiting for work in flight to finish")
        main.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await main
        return
    main.result()
