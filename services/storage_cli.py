"""``fluxpipe storage check``: prove the configured storage works before a task needs it.

Writes a small probe object, reads it back through the SDK, fetches it the way a client would
(the plain URL of a public-read bucket, a fresh pre-signed URL of a private one), and deletes
it. Each step prints one line; the first that fails says what is wrong (COS's error code and
the setting to look at, never a credential) and the command exits 1.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import httpx
import typer

from services.common.settings import Settings
from services.common.storage import Storage, StorageError, make_storage

app = typer.Typer(no_args_is_help=True, help="Object storage tools.")


class CheckFailed(Exception):
    pass


async def run_check(storage: Storage, settings: Settings, say: Callable[[str], None] = typer.echo) -> None:
    key = f"fluxpipe-check/{uuid.uuid4().hex}.txt"
    probe = f"fluxpipe storage check {key}\n".encode()
    try:
        await storage.put(key, probe, "text/plain", {"source": "fluxpipe-check"})
    except StorageError as exc:
        raise CheckFailed(f"write:  {exc}") from None
    say(f"write:  ok ({key})")
    try:
        await _read_back(storage, settings, key, probe, say)
    finally:
        try:
            await storage.delete(key)
        except StorageError as exc:
            raise CheckFailed(f"delete: {exc}") from None
    say("delete: ok")


async def _read_back(
    storage: Storage, settings: Settings, key: str, probe: bytes, say: Callable[[str], None]
) -> None:
    try:
        if await storage.get(key) != probe:
            raise CheckFailed("read:   the probe object came back with different bytes")
    except StorageError as exc:
        raise CheckFailed(f"read:   {exc}") from None
    say("read:   ok")
    if settings.storage_backend != "cos":
        return
    kind = "plain URL (COS_PUBLIC_READ=true)" if settings.cos_public_read else "pre-signed URL"
    try:
        async with httpx.AsyncClient(timeout=settings.cos_timeout) as http:
            response = await http.get(storage.url(key))
    except httpx.HTTPError as exc:
        raise CheckFailed(f"fetch:  the {kind} cannot be reached: {exc.__class__.__name__}: {exc}") from None
    if response.status_code != 200 or response.content != probe:
        hint = ""
        if settings.cos_public_read and response.status_code == 403:
            hint = (
                "; the bucket refuses anonymous reads: unset COS_PUBLIC_READ, or make the bucket public-read"
            )
        raise CheckFailed(f"fetch:  the {kind} answered {response.status_code}, not the probe{hint}")
    say(f"fetch:  ok ({kind})")


@app.command()
def check() -> None:
    """Verify the configured storage: credentials, bucket and region, write, read, URL, delete."""
    settings = Settings()
    try:
        storage = make_storage(settings)
    except ValueError as exc:
        typer.echo(f"storage check failed: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"storage: {storage.describe()}")
    try:
        asyncio.run(run_check(storage, settings))
    except CheckFailed as exc:
        typer.echo(f"storage check failed: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        storage.close()
    typer.echo("storage check passed")
