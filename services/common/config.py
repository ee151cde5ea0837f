"""The live provider configuration: an admin's change reaches every process through the log.

A change is a ``ConfigChanged`` event on ``<prefix>.config.changed`` carrying the whole
configuration, so the subject's last message is the current one. ``LiveConfig`` reads it at
start and then follows the subject (an ordered consumer, re-created by nats-py after a
reconnect), applying each newer message to the process's ``Settings`` in place and calling the
listeners (the submitter resizes its consumer, the submitter and poller re-point their fal
client). Without any event the environment's settings stand.

The fal key: only its Fernet ciphertext (AES-128-CBC + HMAC-SHA256, from ``cryptography``)
ever leaves the gateway, in the event and in the ``flux_config`` row; the Fernet key comes from
``FLUXPIPE_CONFIG_KEY`` (``fluxpipe up`` keeps one in ``<data dir>/config-key``). Services
decrypt it in memory. Responses show only ``mask_key``. A ciphertext that was tampered with, or
a wrong Fernet key, raises ``ConfigKeyError`` saying so; a service then keeps its previous key
and logs the error (never the key).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError
from pydantic import SecretStr

from schemas.events import ConfigChanged, ConfigChangedData, decode_event
from services.common.bus import Bus
from services.common.consumer import Consumer
from services.common.fal import FalClient
from services.common.runtime import RedactingFormatter
from services.common.settings import Settings

log = logging.getLogger(__name__)

Listener = Callable[["LiveConfig"], Awaitable[None]]


class ConfigKeyError(Exception):
    """The fal key cannot be encrypted or decrypted (no, wrong or tampered key material)."""


def config_subject(prefix: str) -> str:
    return f"{prefix}.config.changed"


def _fernet(settings: Settings) -> Fernet:
    material = settings.config_key.get_secret_value()
    if not material:
        raise ConfigKeyError("FLUXPIPE_CONFIG_KEY is not set: the fal key cannot be encrypted or decrypted")
    try:
        return Fernet(material.encode())
    except ValueError as exc:
        raise ConfigKeyError("FLUXPIPE_CONFIG_KEY is not a Fernet key (32 url-safe base64 bytes)") from exc


def check_config_key(settings: Settings) -> None:
    """Refuse to start with a ``FLUXPIPE_CONFIG_KEY`` that is set but is no Fernet key."""
    if settings.config_key.get_secret_value():
        try:
            _fernet(settings)
        except ConfigKeyError as exc:
            raise RuntimeError(str(exc)) from exc


def encrypt_key(settings: Settings, api_key: str) -> str:
    return _fernet(settings).encrypt(api_key.encode()).decode()


def decrypt_key(settings: Settings, ciphertext: str) -> str:
    try:
        return _fernet(settings).decrypt(ciphertext.encode()).decode()
    except InvalidToken as exc:
        raise ConfigKeyError(
            "the stored fal key failed its integrity check: the ciphertext was altered "
            "or FLUXPIPE_CONFIG_KEY is not the key it was encrypted with"
        ) from exc


def mask_key(api_key: str) -> str:
    """What a response may show of a key: its length class and last four characters."""
    if not api_key:
        return ""
    return "****" + api_key[-4:] if len(api_key) >= 12 else "****"


def new_config_key() -> str:
    return Fernet.generate_key().decode()


def from_settings(settings: Settings) -> ConfigChangedData:
    """The configuration a process runs with before any admin changed it."""
    return ConfigChangedData(
        base_url=settings.fal_base_url,
        enabled=True,
        timeout=max(1, round(settings.task_timeout_seconds)),
        max_concurrent_tasks=settings.max_concurrent_tasks,
        default_model=settings.default_model,
    )


async def read_current(bus: Bus) -> tuple[int, ConfigChangedData | None]:
    """The last configuration in the log and its stream sequence (0, None when there is none)."""
    try:
        raw = await bus.js.get_last_msg(bus.stream, config_subject(bus.prefix))
    except NotFoundError:
        return 0, None
    event = decode_event(raw.data or b"")
    assert isinstance(event, ConfigChanged) and raw.seq is not None
    return raw.seq, event.data


def _redact_in_logs(secret: str) -> None:
    for handler in logging.getLogger().handlers:
        formatter = handler.formatter
        if isinstance(formatter, RedactingFormatter) and len(secret) >= 6:
            formatter.secrets.append(secret)


@dataclass
class LiveConfig:
    """This process's view of the configuration, kept current from the log."""

    settings: Settings
    enabled: bool = True
    credit_costs: dict[str, int] = field(default_factory=dict)
    seq: int = 0
    listeners: list[Listener] = field(default_factory=list)
    _sub: JetStreamContext.PushSubscription | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def cost_of(self, model: str) -> int:
        return self.credit_costs.get(model, 0)

    @property
    def credits_on(self) -> bool:
        return any(cost > 0 for cost in self.credit_costs.values())

    async def start(self, bus: Bus) -> None:
        """Apply the current configuration, then follow every change until ``stop``."""
        seq, data = await read_current(bus)
        if data is not None:
            await self.apply(seq, data)

        async def on_msg(msg: Msg) -> None:
            try:
                event = decode_event(msg.data)
            except Exception:
                log.exception("an undecodable configuration event was ignored")
                return
            if isinstance(event, ConfigChanged):
                await self.apply(msg.metadata.sequence.stream, event.data)

        self._sub = await bus.js.subscribe(
            config_subject(bus.prefix),
            stream=bus.stream,
            cb=on_msg,
            ordered_consumer=True,
            config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT),
        )

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def apply(self, seq: int, data: ConfigChangedData) -> None:
        """Take a configuration newer than the one applied; older or equal ones change nothing."""
        async with self._lock:
            if seq <= self.seq:
                return
            s = self.settings
            if data.api_key_encrypted:
                try:
                    key = decrypt_key(s, data.api_key_encrypted)
                except ConfigKeyError as exc:
                    log.error("configuration at stream seq %d: %s; keeping the previous fal key", seq, exc)
                else:
                    _redact_in_logs(key)
                    s.fal_key = SecretStr(key)
            s.fal_base_url = data.base_url
            s.task_timeout_seconds = float(data.timeout)
            s.max_concurrent_tasks = data.max_concurrent_tasks
            s.default_model = data.default_model
            self.enabled = data.enabled
            self.credit_costs = dict(data.credit_costs)
            self.seq = seq
            log.info(
                "configuration at stream seq %d applied (changed: %s)", seq, ", ".join(data.changed) or "-"
            )
            for listener in self.listeners:
                try:
                    await listener(self)
                except Exception:
                    log.exception("applying the configuration at stream seq %d failed in part", seq)


def load_or_create_config_key(path: Path) -> str:
    """The installation's Fernet key kept in the data folder (``fluxpipe up``), made on first use."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = new_config_key()
    path.touch(mode=0o600)
    path.write_text(key)
    return key


async def follow(
    settings: Settings,
    bus: Bus,
    stack: contextlib.AsyncExitStack,
    fal: FalClient,
    consumer: Consumer | None = None,
) -> LiveConfig:
    """Keep a worker's fal client (base URL, key) and, if given, its consumer's in-flight cap
    (``max_ack_pending`` and this process's concurrency = ``max_concurrent_tasks``) in step with
    the configuration, from now until the stack closes."""

    async def retarget(live: LiveConfig) -> None:
        fal.reconfigure(settings.fal_base_url, settings.fal_key.get_secret_value())
        if consumer is not None and consumer.max_ack_pending != settings.max_concurrent_tasks:
            consumer.max_ack_pending = consumer.concurrency = settings.max_concurrent_tasks
            await consumer.ensure(bus)

    live = LiveConfig(settings, listeners=[retarget])
    await live.start(bus)
    stack.push_async_callback(live.stop)
    return live
