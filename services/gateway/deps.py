"""Dependencies of the gateway's routes, as ``Annotated`` aliases.

Every dependency here is ``async def``: none of them blocks, and FastAPI runs a plain ``def``
dependency in its thread pool, a thread hop per dependency per request (about a fifth of the
gateway's profile under load before they became ``async``)."""

from __future__ import annotations

import base64
import json
import time
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncEngine

from services.common.auth import FORWARDED_HEADERS, Forbidden, InvalidToken, Principal, authenticate
from services.common.bus import Bus
from services.common.settings import Settings
from services.common.storage import Storage

_bearer = HTTPBearer(
    auto_error=False,
    description="`fluxpipe token`, an Open WebUI session token, or a service key (README, Authentication)",
)


async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


async def get_bus(request: Request) -> Bus:
    return request.app.state.bus


async def get_engine(request: Request) -> AsyncEngine:
    return request.app.state.engine


async def get_storage(request: Request) -> Storage:
    return request.app.state.storage


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
BusDep = Annotated[Bus, Depends(get_bus)]
EngineDep = Annotated[AsyncEngine, Depends(get_engine)]
StorageDep = Annotated[Storage, Depends(get_storage)]


class VerifiedTokens:
    """Bearer JWTs this process has verified, with their caller, each until its ``exp`` (and at
    most ``MAX_AGE``): a token's signature and claims verify the same way every time, so a
    second verification would only cost CPU (an eighth of a submit's in the gateway). Nothing is accepted for
    longer than verification would accept it: the ``exp`` kept is the token's own, without
    the leeway verification allows. Only bare tokens are kept: a request with Open WebUI's
    forwarded-user headers, or with a service key, is authenticated in full every time."""

    MAX_AGE = 300.0
    SIZE = 10_000

    def __init__(self) -> None:
        self.entries: dict[str, tuple[Principal, float]] = {}

    def get(self, token: str) -> Principal | None:
        hit = self.entries.get(token)
        if hit is None:
            return None
        if time.time() >= hit[1]:
            del self.entries[token]
            return None
        return hit[0]

    def keep(self, token: str, principal: Principal) -> None:
        if principal.via not in ("fluxpipe-token", "open-webui-session"):
            return
        try:
            payload = token.split(".")[1]
            exp = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"]
            until = min(float(exp), time.time() + self.MAX_AGE)
        except (IndexError, ValueError, KeyError, TypeError):
            return
        if len(self.entries) >= self.SIZE:
            self.entries.clear()
        self.entries[token] = (principal, until)


async def current_user(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The authenticated caller (services/common/auth.py); 401 or 403 naming what was wrong."""
    state = request.app.state
    token = credentials.credentials if credentials else None
    verified: VerifiedTokens | None = getattr(state, "verified_tokens", None)
    if verified is None:
        verified = state.verified_tokens = VerifiedTokens()
    headers = request.headers
    bare = token is not None and not any(h in headers for h in FORWARDED_HEADERS)
    if bare and token is not None and (known := verified.get(token)) is not None:
        return known
    try:
        principal = authenticate(state.settings, token, headers)
    except InvalidToken as exc:
        message = str(exc) if credentials is None else f"invalid token: {exc}"
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, message, headers={"WWW-Authenticate": "Bearer"}
        ) from exc
    except Forbidden as exc:
        raise HTTPException(status.HTTP_403_FORBIDDEN, str(exc)) from exc
    if bare and token is not None:
        verified.keep(token, principal)
    return principal


CurrentUser = Annotated[Principal, Depends(current_user)]


async def admin_user(user: CurrentUser) -> Principal:
    """The caller, if an admin; 403 otherwise."""
    if not user.admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"user {user.user_id!r} is not an admin")
    return user


AdminUser = Annotated[Principal, Depends(admin_user)]
