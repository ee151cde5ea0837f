"""A lean reader of the event log for ``fluxpipe replay``: raw NATS protocol, no ``Msg`` objects.

nats-py spends most of a replay's CPU turning each delivery into a ``Msg`` (protocol regex,
header parsing, the ordered consumer's bookkeeping). A replay needs three things per message:
its stream sequence, its subject and its bytes. So ``LogReader`` opens its own plain TCP
connection to the server the bus is connected to, and drains an ephemeral pull consumer
(created and deleted through the bus) with a few large pull requests kept in flight, parsing
``HMSG``/``MSG`` frames itself.

Invariants:
- Messages come out in stream order, each exactly once: the consumer is ``AckPolicy.NONE``
  with a single reader, and every delivery's consumer sequence must follow the previous one
  (a gap raises instead of silently folding a log with holes).
- ``read`` returns once it has delivered the message at ``until_seq``, or a message after
  which the consumer had nothing pending (nothing exists between it and ``until_seq``).
- A stream that delivers nothing for ``stall`` seconds raises; so does any status the server
  answers a pull with (consumer deleted, too many waiting pulls, ...): pulls never expire.
- Only the plain protocol is spoken: a server that requires TLS (or a ``tls://`` URL) makes
  ``open`` return ``None`` and the caller reads through nats-py instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from nats.js import api

from services.common.bus import Bus
from services.common.settings import Settings

# (stream sequence, subject, raw headers or b"", payload)
Delivery = tuple[int, bytes, bytes, bytes]

BATCH = 20_000  # messages per pull request; up to two are in flight
READ_SIZE = 1 << 20
CRLF = b"\r\n"


def header_names(headers: bytes) -> set[bytes]:
    """The names in a raw ``NATS/1.0`` header block."""
    return {line.split(b":", 1)[0].strip() for line in headers.split(CRLF)[1:] if b":" in line}


class Unsupported(Exception):
    """The server or URL needs something this reader does not speak (TLS)."""


class LogReader:
    """One raw connection to the server ``bus`` is connected to; ``read`` as often as needed."""

    def __init__(self, bus: Bus, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.bus = bus
        self._reader = reader
        self._writer = writer
        self._inbox = f"_INBOX.replay.{uuid.uuid4().hex}".encode()
        self._buf = bytearray()
        self._sid = 0
        self._received = 0  # deliveries of the current read

    @classmethod
    async def open(cls, bus: Bus, settings: Settings) -> LogReader | None:
        url = bus.nc.connected_url
        if url is None or url.scheme not in ("nats", ""):
            return None
        reader, writer = await asyncio.open_connection(url.hostname, url.port or 4222, limit=READ_SIZE * 4)
        self = cls(bus, reader, writer)
        try:
            await self._handshake(settings, url.username, url.password)
        except Unsupported:
            await self.close()
            return None
        except BaseException:
            await self.close()
            raise
        return self

    async def _handshake(self, settings: Settings, username: str | None, password: str | None) -> None:
        line = await asyncio.wait_for(self._reader.readuntil(CRLF), 10)
        if not line.startswith(b"INFO "):
            raise RuntimeError(f"NATS greeted the replay with {line[:80]!r}")
        info = json.loads(line[5:])
        if info.get("tls_required"):
            raise Unsupported("the server requires TLS")
        options: dict[str, Any] = {
            "verbose": False,
            "pedantic": False,
            "headers": True,
            "no_responders": True,
            "protocol": 1,
            "lang": "python-raw",
            "version": "1",
            "name": "fluxpipe-replay",
        }
        if settings.nats_user:
            options["user"] = settings.nats_user
            options["pass"] = settings.nats_password.get_secret_value()
        elif username and password is not None:
            options["user"], options["pass"] = username, password
        elif username:
            options["auth_token"] = username
        self._writer.write(b"CONNECT " + json.dumps(options).encode() + b"\r\nPING\r\n")
        await self._writer.drain()
        while True:
            line = await asyncio.wait_for(self._reader.readuntil(CRLF), 10)
            if line.startswith(b"PONG"):
                break
            if line.startswith(b"-ERR"):
                raise RuntimeError(f"NATS refused the replay's connection: {line.decode().strip()}")

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    async def read(
        self, after_seq: int, until_seq: int, *, stall: float = 10.0
    ) -> AsyncGenerator[list[Delivery], None]:
        """Every message of the bus's events subjects with ``after_seq < seq <= until_seq``, in
        stream order, in chunks (one per socket read). Each call has its own consumer and
        subscription id; frames still in flight for an earlier call are skipped."""
        if until_seq <= after_seq:
            return
        bus = self.bus
        consumer = await bus.js.add_consumer(
            bus.stream,
            api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=after_seq + 1,
                ack_policy=api.AckPolicy.NONE,
                filter_subject=bus.events_subject(),
                mem_storage=True,
                inactive_threshold=60.0,
            ),
        )
        self._sid += 1
        sid = str(self._sid).encode()
        inbox = self._inbox + b"." + sid
        pull = f"$JS.API.CONSUMER.MSG.NEXT.{bus.stream}.{consumer.name}".encode()
        at_most = until_seq - after_seq  # messages in the range, at most (sequences may have gaps)
        requested = 0

        def ask() -> None:
            nonlocal requested
            while requested < at_most and requested < self._received + 2 * BATCH:
                n = min(BATCH, at_most - requested)
                body = b'{"batch":%d}' % n
                self._writer.write(b"PUB %s %s %d\r\n%s\r\n" % (pull, inbox, len(body), body))
                requested += n

        self._received = 0
        self._writer.write(b"SUB " + inbox + b" " + sid + b"\r\n")
        ask()
        try:
            while True:
                chunk, finished = self._parse(sid, until_seq)
                ask()
                if chunk:
                    yield chunk
                if finished:
                    return
                more = await asyncio.wait_for(self._reader.read(READ_SIZE), stall)
                if not more:
                    raise RuntimeError("NATS closed the replay's connection")
                self._buf += more
        except TimeoutError:
            raise RuntimeError(
                f"the stream stopped delivering after {self._received:,} messages "
                f"(seq {after_seq + 1:,} to {until_seq:,})"
            ) from None
        finally:
            self._writer.write(b"UNSUB " + sid + b"\r\n")
            with contextlib.suppress(Exception):
                await bus.js.delete_consumer(bus.stream, consumer.name)

    def _parse(self, sid: bytes, until_seq: int) -> tuple[list[Delivery], bool]:
        """The deliveries complete in the buffer (consumed from it), and whether the read is
        over (``until_seq`` reached, or nothing pending after the last delivery)."""
        buf = self._buf
        out: list[Delivery] = []
        pos = 0
        finished = False
        size = len(buf)
        while not finished:
            eol = buf.find(CRLF, pos)
            if eol < 0:
                break
            line = bytes(buf[pos:eol])
            if line.startswith((b"HMSG ", b"MSG ")):
                parts = line.split(b" ")
                headed = parts[0] == b"HMSG"
                reply = parts[3] if len(parts) == (6 if headed else 5) else b""
                total = int(parts[-1])
                header_len = int(parts[-2]) if headed else 0
                start = eol + 2
                if start + total + 2 > size:
                    break  # the frame's body has not arrived yet
                pos = start + total + 2
                if parts[2] != sid:
                    continue  # in flight for an earlier read
                headers = bytes(buf[start : start + header_len])
                if not reply.startswith(b"$JS.ACK."):
                    self._status(headers)
                    continue
                tokens = reply.split(b".")
                v1 = len(tokens) == 9  # $JS.ACK.<stream>.<consumer>.<delivered>.<seq>.<cseq>.<ts>.<pending>
                cseq = int(tokens[6 if v1 else 8])
                if cseq != self._received + 1:
                    raise RuntimeError(f"the stream's delivery skipped from {self._received} to {cseq}")
                self._received = cseq
                seq = int(tokens[5 if v1 else 7])
                out.append((seq, parts[1], headers, bytes(buf[start + header_len : start + total])))
                finished = seq >= until_seq or tokens[8 if v1 else 10] == b"0"
            else:
                pos = eol + 2
                if line == b"PING":
                    self._writer.write(b"PONG\r\n")
                elif line.startswith(b"-ERR"):
                    raise RuntimeError(f"NATS: {line.decode(errors='replace')}")
        del buf[:pos]
        return out, finished

    def _status(self, headers: bytes) -> None:
        """A status the server answered a pull request with. The pulls never expire, so any
        but a heartbeat means the consumer is gone or refused (deleted, too many pulls)."""
        status = headers.split(CRLF, 1)[0].decode(errors="replace")
        if status[9:12] != "100":
            raise RuntimeError(f"the replay's consumer got {status!r}")
