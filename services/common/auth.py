"""Bearer tokens: HS256 JWTs signed with the configured secret (PyJWT)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt

from services.common.settings import Settings

MAX_USER_ID = 255  # flux_tasks.user_id


@dataclass(frozen=True)
class Principal:
    user_id: str
    admin: bool = False


class InvalidToken(Exception):
    pass


def issue_token(
    settings: Settings, user_id: str, *, admin: bool = False, ttl: timedelta | None = None
) -> str:
    now = datetime.now(UTC)
    claims: dict[str, object] = {"sub": user_id, "admin": admin, "iat": now, "iss": settings.jwt_issuer}
    if ttl is not None:
        claims["exp"] = now + ttl
    return jwt.encode(claims, _secret(settings), algorithm="HS256")


def verify_token(settings: Settings, token: str) -> Principal:
    try:
        claims = jwt.decode(
            token,
            _secret(settings),
            algorithms=["HS256"],
            issuer=settings.jwt_issuer,
            options={"require": ["sub", "iat"]},
        )
    except jwt.PyJWTError as exc:
        raise InvalidToken(str(exc)) from exc
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise InvalidToken("token has no subject")
    if len(sub) > MAX_USER_ID or not sub.isprintable():
        raise InvalidToken(f"the subject must be at most {MAX_USER_ID} printable characters")
    return Principal(user_id=sub, admin=bool(claims.get("admin", False)))


def check_secret(settings: Settings) -> None:
    """Refuse to run with a missing or guessable signing secret."""
    if len(settings.jwt_secret.get_secret_value()) < 32:
        raise RuntimeError("FLUXPIPE_JWT_SECRET must be set to at least 32 characters")


def _secret(settings: Settings) -> str:
    check_secret(settings)
    return settings.jwt_secret.get_secret_value()


def load_or_create_secret(path: Path) -> str:
    """A per-installation secret kept in the data folder, so dev tokens survive restarts."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    path.write_text(secret)
    path.chmod(0o600)
    return secret
