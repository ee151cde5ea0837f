"""Dependencies of the gateway's routes, as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncEngine

from services.common.auth import Forbidden, InvalidToken, Principal, authenticate
from services.common.bus import Bus
from services.common.settings import Settings
from services.common.storage import Storage

_bearer = HTTPBearer(
    auto_error=False,
    description="`fluxpipe token`, an Open WebUI session token, or a service key (README, Authentication)",
)


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def get_bus(request: Request) -> Bus:
    return request.app.state.bus


def get_engine(request: Request) -> AsyncEngine:
    return request.app.state.engine


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
BusDep = Annotated[Bus, Depends(get_bus)]
EngineDep = Annotated[AsyncEngine, Depends(get_engine)]
StorageDep = Annotated[Storage, Depends(get_storage)]


def current_user(
    request: Request,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The authenticated caller (services/common/auth.py); 401 or 403 naming what was wrong."""
    try:
        return authenticate(settings, credentials.credentials if credentials else None, request.headers)
    except InvalidToken as exc:
        message = str(exc) if credentials is None else f"invalid token: {exc}"
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, message, headers={"WWW-Authenticate": "Bearer"}
        ) from exc
    except Forbidden as exc:
        raise HTTPException(status.HTTP_403_FORBIDDEN, str(exc)) from exc


CurrentUser = Annotated[Principal, Depends(current_user)]


def admin_user(user: CurrentUser) -> Principal:
    """The caller, if an admin; 403 otherwise."""
    if not user.admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"user {user.user_id!r} is not an admin")
    return user


AdminUser = Annotated[Principal, Depends(admin_user)]
