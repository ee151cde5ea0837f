"""One settings class for every fluxpipe process, read from the environment.

Names follow the environment variables operators set (``NATS_URL``, ``DATABASE_URL``,
``FAL_KEY``…). Secrets are ``SecretStr`` so they never print by accident.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    nats_url: str = Field("nats://127.0.0.1:4222", validation_alias="NATS_URL")
    database_url: str = Field(
        "postgresql://postgres@127.0.0.1:5432/postgres", validation_alias="DATABASE_URL"
    )
    stream_name: str = Field("FLUX", validation_alias="FLUXPIPE_STREAM")
    subject_prefix: str = Field("flux", validation_alias="FLUXPIPE_SUBJECT_PREFIX")
    stream_replicas: int = Field(1, validation_alias="FLUXPIPE_STREAM_REPLICAS")

    fal_base_url: str = Field("https://queue.fal.run", validation_alias="FAL_BASE_URL")
    fal_key: SecretStr = Field(SecretStr(""), validation_alias="FAL_KEY")

    jwt_secret: SecretStr = Field(SecretStr(""), validation_alias="FLUXPIPE_JWT_SECRET")
    jwt_issuer: str = Field("fluxpipe", validation_alias="FLUXPIPE_JWT_ISSUER")

    storage_dir: Path = Field(Path(".data/storage"), validation_alias="FLUXPIPE_STORAGE_DIR")
    public_base_url: str = Field("http://127.0.0.1:8080", validation_alias="FLUXPIPE_PUBLIC_URL")

    task_timeout_seconds: float = Field(300.0, validation_alias="FLUXPIPE_TASK_TIMEOUT")
    failover_seconds: float = Field(30.0, ge=1, validation_alias="FLUXPIPE_FAILOVER_SECONDS")
    stuck_task_grace_seconds: float = Field(120.0, validation_alias="FLUXPIPE_STUCK_TASK_GRACE")
    max_concurrent_tasks: int = Field(5, validation_alias="FLUXPIPE_MAX_CONCURRENT_TASKS")
    default_model: str = Field("fal-ai/flux-1/dev", validation_alias="FLUXPIPE_DEFAULT_MODEL")
    poll_interval_min: float = Field(0.5, validation_alias="FLUXPIPE_POLL_MIN")
    poll_interval_max: float = Field(5.0, validation_alias="FLUXPIPE_POLL_MAX")
    max_image_bytes: int = Field(50 * 1024 * 1024, validation_alias="FLUXPIPE_MAX_IMAGE_BYTES")

    log_level: str = Field("INFO", validation_alias="FLUXPIPE_LOG_LEVEL")
    metrics_port: int = Field(0, ge=0, validation_alias="FLUXPIPE_METRICS_PORT")
    metrics_host: str = Field("127.0.0.1", validation_alias="FLUXPIPE_METRICS_HOST")

    openai_wait_seconds: float = Field(240.0, gt=0, validation_alias="FLUXPIPE_OPENAI_WAIT")
    openai_model_aliases: dict[str, str] = Field(
        default_factory=dict, validation_alias="FLUXPIPE_OPENAI_MODEL_ALIASES"
    )
    openai_edit_model: str = Field("fal-ai/flux-pro/kontext", validation_alias="FLUXPIPE_OPENAI_EDIT_MODEL")
    # Users and secrets (services/common/auth.py; README "Authentication").
    idempotency_secret: SecretStr = Field(SecretStr(""), validation_alias="FLUXPIPE_IDEMPOTENCY_SECRET")
    webui_secret_key: SecretStr = Field(SecretStr(""), validation_alias="WEBUI_SECRET_KEY")
    webui_forwarded_jwt_secret: SecretStr = Field(
        SecretStr(""), validation_alias="FLUXPIPE_WEBUI_FORWARDED_JWT_SECRET"
    )
    service_keys: SecretStr = Field(SecretStr(""), validation_alias="FLUXPIPE_SERVICE_KEYS")
    admin_users: str = Field("", validation_alias="FLUXPIPE_ADMIN_USERS")
    body_limit_bytes: int = Field(1024 * 1024, ge=1, validation_alias="FLUXPIPE_MAX_BODY_BYTES")
    body_limits: str = Field(
        "/api/flux/upload-image=11534336,/v1/images/edits=46137344", validation_alias="FLUXPIPE_BODY_LIMITS"
    )
    nats_user: str = Field("", validation_alias="NATS_USER")
    nats_password: SecretStr = Field(SecretStr(""), validation_alias="NATS_PASSWORD")
    stream_max_age_seconds: float = Field(0.0, ge=0, validation_alias="FLUXPIPE_STREAM_MAX_AGE")
    stream_max_bytes: int = Field(-1, ge=-1, validation_alias="FLUXPIPE_STREAM_MAX_BYTES")

    @property
    def admin_user_ids(self) -> frozenset[str]:
        """``FLUXPIPE_ADMIN_USERS``: comma-separated user ids with admin rights."""
        return frozenset(u.strip() for u in self.admin_users.split(",") if u.strip())

    @property
    def body_limit_prefixes(self) -> dict[str, int]:
        """``FLUXPIPE_BODY_LIMITS``: ``/path/prefix=bytes,…``, overriding ``FLUXPIPE_MAX_BODY_BYTES``."""
        limits: dict[str, int] = {}
        for item in self.body_limits.split(","):
            if item.strip():
                prefix, _, size = item.partition("=")
                limits[prefix.strip()] = int(size)
        return limits

    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1, validation_alias="FLUXPIPE_MAX_UPLOAD_BYTES")
    max_upload_pixels: int = Field(25_000_000, ge=1, validation_alias="FLUXPIPE_MAX_UPLOAD_PIXELS")
    trusted_image_hosts: str = Field("", validation_alias="FLUXPIPE_TRUSTED_IMAGE_HOSTS")

    config_key: SecretStr = Field(SecretStr(""), validation_alias="FLUXPIPE_CONFIG_KEY")
    rate_limit_window: float = Field(60.0, gt=0, validation_alias="FLUXPIPE_RATE_WINDOW")
    rate_limit_jobs: int = Field(60, ge=0, validation_alias="FLUXPIPE_RATE_JOBS")
    rate_limit_uploads: int = Field(30, ge=0, validation_alias="FLUXPIPE_RATE_UPLOADS")
    max_tasks_per_user: int = Field(0, ge=0, validation_alias="FLUXPIPE_MAX_TASKS_PER_USER")

    webhook_base_url: str = Field("", validation_alias="FLUXPIPE_WEBHOOK_BASE_URL")
    fal_jwks_url: str = Field(
        "https://rest.alpha.fal.ai/.well-known/jwks.json", validation_alias="FAL_JWKS_URL"
    )
    webhook_tolerance_seconds: float = Field(300.0, gt=0, validation_alias="FLUXPIPE_WEBHOOK_TOLERANCE")
    jwks_cache_seconds: float = Field(3600.0, gt=0, le=86400, validation_alias="FLUXPIPE_JWKS_CACHE_SECONDS")
    fal_result_hosts: str = Field("fal.media,*.fal.media", validation_alias="FLUXPIPE_FAL_RESULT_HOSTS")

    @property
    def webhook_url_base(self) -> str | None:
        """Where fal's webhooks reach the gateway (``<base>/api/flux/webhooks/fal/<task>``), or
        None: completion is then detected by polling alone."""
        return self.webhook_base_url.rstrip("/") or None

    # Object storage: ``local`` (a folder the gateway serves) or ``cos`` (Tencent COS); see
    # docs/DEPLOYMENT.md. COS credentials are secrets like the fal key.
    storage_backend: Literal["local", "cos"] = Field("local", validation_alias="FLUXPIPE_STORAGE")
    cos_bucket: str = Field("", validation_alias="COS_BUCKET")
    cos_region: str = Field("", validation_alias="COS_REGION")
    cos_secret_id: SecretStr = Field(SecretStr(""), validation_alias="COS_SECRET_ID")
    cos_secret_key: SecretStr = Field(SecretStr(""), validation_alias="COS_SECRET_KEY")
    cos_token: SecretStr = Field(SecretStr(""), validation_alias="COS_TOKEN")
    cos_scheme: Literal["https", "http"] = Field("https", validation_alias="COS_SCHEME")
    cos_domain: str = Field("", validation_alias="COS_DOMAIN")
    cos_public_base_url: str = Field("", validation_alias="COS_PUBLIC_BASE_URL")
    cos_public_read: bool = Field(False, validation_alias="COS_PUBLIC_READ")
    cos_url_expires: int = Field(3600, ge=60, validation_alias="COS_URL_EXPIRES")
    cos_key_prefix: str = Field("", validation_alias="COS_KEY_PREFIX")
    cos_timeout: float = Field(30.0, gt=0, validation_alias="COS_TIMEOUT")
    cos_threads: int = Field(8, ge=1, validation_alias="COS_THREADS")
    cos_retry_attempts: int = Field(4, ge=1, validation_alias="COS_RETRY_ATTEMPTS")
    cos_part_size: int = Field(8 * 1024 * 1024, ge=1024 * 1024, validation_alias="COS_PART_SIZE")

    @property
    def async_database_url(self) -> str:
        """The database URL with the asyncpg driver, whatever scheme the operator gave."""
        url = self.database_url
        for prefix in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+asyncpg://" + url[len(prefix) :]
        return url

    @property
    def asyncpg_dsn(self) -> str:
        """The database URL as plain asyncpg expects it."""
        return "postgresql://" + self.async_database_url[len("postgresql+asyncpg://") :]


@lru_cache
def get_settings() -> Settings:
    return Settings()
