"""Who is calling: bearer tokens of three kinds, service keys, and Open WebUI's forwarded user.

A caller authenticates with exactly one ``Authorization: Bearer <credential>``:

- our own token (``fluxpipe token``): HS256, ``FLUXPIPE_JWT_SECRET``, ``iss`` = the configured
  issuer, ``sub``, ``iat`` and ``exp`` required; ``admin`` counts only as the JSON boolean ``true``;
- Open WebUI's session token: HS256, ``WEBUI_SECRET_KEY``, user id in ``id``, ``exp`` and ``jti``
  required, ``typ`` (newer versions) must be ``"session"`` when present;
- a service key (``FLUXPIPE_SERVICE_KEYS``): the caller is the key's own user, and a key allowed
  to assert users may name the end user with Open WebUI's forwarded headers
  (``X-OpenWebUI-User-Id`` / ``-Name`` / ``-Email`` / ``-Role``) or its ``X-OpenWebUI-User-Jwt``
  (HS256, ``iss`` = ``open-webui``, ``sub``, ``iat``, ``exp`` required).

Invariants: the algorithm is pinned to HS256 (``none``, HS512 and public-key algorithms are
refused); forwarded-user headers are honoured only from a service key allowed to assert users
and refused (403) from anyone else when they name another user (a user's own id alongside their
own token adds nothing and grants nothing, e.g. no role); service keys are compared in
constant time. Admins are Open WebUI's ``role: "admin"``, our ``admin: true`` or a user id in
``FLUXPIPE_ADMIN_USERS``.
"""

from __future__ import annotations

import hmac
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

import jwt
from pydantic import BaseModel, Field, ValidationError

from services.common.settings import Settings

MAX_USER_ID = 255  # flux_tasks.user_id
DEFAULT_TTL = timedelta(hours=12)
DEV_TTL = timedelta(days=365)
ALGORITHMS = ["HS256"]
WEBUI_ISSUER = "open-webui"
FORWARDED_HEADERS = (
    "x-openwebui-user-id",
    "x-openwebui-user-name",
    "x-openwebui-user-email",
    "x-openwebui-user-role",
    "x-openwebui-user-jwt",
)

Via = Literal["fluxpipe-token", "open-webui-session", "service-key", "open-webui-forwarded"]


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. ``via`` says how: which credential proved who they are."""

    user_id: str
    admin: bool = False
    via: Via = "fluxpipe-token"
    name: str | None = None
    email: str | None = None
    service: str | None = None  # the service key's user, when a service asserted this user


class InvalidToken(Exception):
    """The credential proves nothing (401)."""


class Forbidden(Exception):
    """The caller is known but may not do what it asked (403)."""


class ServiceKey(BaseModel):
    """One entry of ``FLUXPIPE_SERVICE_KEYS`` (a JSON list of these)."""

    user_id: str = Field(min_length=1, max_length=MAX_USER_ID)
    key: str = Field(min_length=32)
    assert_users: bool = False


def issue_token(
    settings: Settings, user_id: str, *, admin: bool = False, ttl: timedelta | None = DEFAULT_TTL
) -> str:
    """Our own token; ``ttl=None`` only for tests of tokens without an expiry (which are refused)."""
    now = datetime.now(UTC)
    claims: dict[str, object] = {"sub": user_id, "admin": admin, "iat": now, "iss": settings.jwt_issuer}
    if ttl is not None:
        claims["exp"] = now + ttl
    return jwt.encode(claims, _secret(settings), algorithm="HS256")


def verify_token(settings: Settings, token: str) -> Principal:
    """A bearer JWT: ours or an Open WebUI session token, told apart by their claims."""
    try:
        unverified = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise InvalidToken(str(exc)) from exc
    if "id" in unverified and "sub" not in unverified and "iss" not in unverified:
        return _open_webui_session(settings, token)
    claims = _decode(
        token,
        _secret(settings),
        issuer=settings.jwt_issuer,
        require=["sub", "iat", "exp", "iss"],
    )
    return Principal(
        user_id=_user_id(claims.get("sub")),
        admin=claims.get("admin") is True or _listed_admin(settings, claims.get("sub")),
        via="fluxpipe-token",
    )


def authenticate(settings: Settings, credential: str | None, headers: Mapping[str, str]) -> Principal:
    """The caller of one request, from its bearer credential and Open WebUI's headers."""
    if not credential:
        raise InvalidToken("missing bearer token (Authorization: Bearer <token>)")
    forwarded = {h: headers[h] for h in FORWARDED_HEADERS if h in headers}
    service = _service_key(settings, credential)
    if service is None:
        principal = verify_token(settings, credential)
        if forwarded and forwarded.get("x-openwebui-user-id") != principal.user_id:
            raise Forbidden(
                f"{', '.join(forwarded)}: only a service key allowed to assert users may send "
                "forwarded-user headers"
            )
        return principal
    if not forwarded:
        return Principal(
            user_id=service.user_id, admin=_listed_admin(settings, service.user_id), via="service-key"
        )
    if not service.assert_users:
        raise Forbidden(f"the service key of {service.user_id!r} may not assert users")
    return _forwarded_user(settings, forwarded, service)


def _forwarded_user(settings: Settings, forwarded: dict[str, str], service: ServiceKey) -> Principal:
    if token := forwarded.get("x-openwebui-user-jwt"):
        secret = settings.webui_forwarded_jwt_secret.get_secret_value() or (
            settings.webui_secret_key.get_secret_value()
        )
        if not secret:
            raise InvalidToken("X-OpenWebUI-User-Jwt: no secret is configured to verify it")
        claims = _decode(token, secret, issuer=WEBUI_ISSUER, require=["sub", "iat", "exp", "iss"])
        user_id = _user_id(claims.get("sub"))
        role, name, email = claims.get("role"), claims.get("name"), claims.get("email")
    else:
        if "x-openwebui-user-id" not in forwarded:
            raise InvalidToken("forwarded-user headers without X-OpenWebUI-User-Id")
        user_id = _user_id(forwarded["x-openwebui-user-id"])
        role = forwarded.get("x-openwebui-user-role")
        name = unquote(forwarded["x-openwebui-user-name"]) if "x-openwebui-user-name" in forwarded else None
        email = forwarded.get("x-openwebui-user-email")
    return Principal(
        user_id=user_id,
        admin=role == "admin" or _listed_admin(settings, user_id),
        via="open-webui-forwarded",
        name=name if isinstance(name, str) else None,
        email=email if isinstance(email, str) else None,
        service=service.user_id,
    )


def _open_webui_session(settings: Settings, token: str) -> Principal:
    secret = settings.webui_secret_key.get_secret_value()
    if not secret:
        raise InvalidToken("Open WebUI session tokens are not accepted here (WEBUI_SECRET_KEY is not set)")
    claims = _decode(token, secret, issuer=None, require=["id", "exp", "jti"])
    if claims.get("typ", "session") != "session":
        raise InvalidToken(f"an Open WebUI token of type {claims.get('typ')!r} is not a session token")
    user_id = _user_id(claims.get("id"))
    return Principal(user_id=user_id, admin=_listed_admin(settings, user_id), via="open-webui-session")


def _decode(token: str, secret: str, *, issuer: str | None, require: list[str]) -> dict[str, Any]:
    try:
        return jwt.decode(
            token,
            secret,
            algorithms=ALGORITHMS,
            issuer=issuer,
            options={"require": require, "verify_exp": True, "verify_iat": True},
            leeway=30,
        )
    except jwt.PyJWTError as exc:
        raise InvalidToken(str(exc)) from exc


def _user_id(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidToken("the token names no user")
    if len(value) > MAX_USER_ID or not value.isprintable():
        raise InvalidToken(f"a user id must be at most {MAX_USER_ID} printable characters")
    return value


def _listed_admin(settings: Settings, user_id: object) -> bool:
    return isinstance(user_id, str) and user_id in settings.admin_user_ids


def service_keys(settings: Settings) -> list[ServiceKey]:
    """``FLUXPIPE_SERVICE_KEYS``: a JSON list of ``{"user_id", "key", "assert_users"}``."""
    raw = settings.service_keys.get_secret_value().strip()
    if not raw:
        return []
    try:
        entries = json.loads(raw)
        if not isinstance(entries, list):
            raise ValueError("not a JSON list")
        return [ServiceKey.model_validate(entry) for entry in entries]
    except (ValueError, ValidationError) as exc:
        # The message must not echo the keys themselves.
        raise RuntimeError(
            "FLUXPIPE_SERVICE_KEYS must be a JSON list of {user_id, key (32+ chars), assert_users}"
        ) from exc


def _service_key(settings: Settings, credential: str) -> ServiceKey | None:
    found = None
    for entry in service_keys(settings):
        if hmac.compare_digest(entry.key.encode(), credential.encode()):
            found = entry
    return found


def parse_ttl(text: str) -> timedelta:
    """``30m``, ``12h``, ``7d`` or plain seconds; positive, at most a year."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise ValueError(f"{text!r} is not a duration such as 30m, 12h or 7d") from None
    if not 0 < seconds <= DEV_TTL.total_seconds():
        raise ValueError(f"{text!r}: a token's lifetime must be positive and at most 365d")
    return timedelta(seconds=seconds)


def check_secret(settings: Settings) -> None:
    """Refuse to run with a missing or guessable signing or idempotency secret, or bad keys."""
    if len(settings.jwt_secret.get_secret_value()) < 32:
        raise RuntimeError("FLUXPIPE_JWT_SECRET must be set to at least 32 characters")
    if len(settings.idempotency_secret.get_secret_value()) < 32:
        raise RuntimeError("FLUXPIPE_IDEMPOTENCY_SECRET must be set to at least 32 characters")
    service_keys(settings)


def _secret(settings: Settings) -> str:
    if len(settings.jwt_secret.get_secret_value()) < 32:
        raise RuntimeError("FLUXPIPE_JWT_SECRET must be set to at least 32 characters")
    return settings.jwt_secret.get_secret_value()


def load_or_create_secret(path: Path) -> str:
    """A per-installation secret kept in the data folder, so dev tokens survive restarts."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    path.touch(mode=0o600)
    path.write_text(secret)
    return secret
