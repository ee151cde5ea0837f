"""Input image URLs: which ones a job may name, and how fal gets our own uploads.

A job's image URL is either one of the caller's own uploads (``POST /api/flux/upload-image``,
recognised by our storage's URL and the caller's key prefix) or a public ``https`` URL. Every
other URL is refused before anything is published: other schemes, and hosts that are or
resolve to loopback, private, link-local, multicast, reserved, unspecified, shared or cloud
metadata addresses, however the address is written (decimal ``2130706433``, hex
``0x7f000001``, octal ``0177.0.0.1``, short ``127.1``, IPv6-mapped ``::ffff:127.0.0.1``,
6to4, Teredo, NAT64). Names are resolved with the event loop's ``getaddrinfo`` (a thread),
never blocking it, and every address a name resolves to must be public.

``probe`` then fetches the URL hop by hop, checking each redirect target by the same rules,
and looks at the first bytes: a URL that redirects to a private address, does not answer 200
or is not a jpg/png/webp is refused too. The check is ours; fal fetches the URL again itself,
so a host that changes its answers between the two (DNS rebinding) is fal's fetch to guard.

``FLUXPIPE_TRUSTED_IMAGE_HOSTS`` (``host[:port]``, comma separated) exempts hosts an operator
vouches for (an internal image service, a test server) from the scheme and address rules.

Local storage is not reachable by fal, so the submitter hands our own uploads to fal inline
as a data URI (``inline_own_uploads``); URLs of other storages are public and pass as they are.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import re
import socket
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx

from services.common.settings import Settings
from services.common.storage import Storage

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

UPLOAD_KEY = re.compile(r"^uploads/(?P<owner>[0-9a-f]{20})/flux_input_[0-9a-f]{32}\.(?:jpg|png|webp)$")
CONTENT_TYPES = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}

METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "168.63.129.16", "fd00:ec2::254")
)
METADATA_NAMES = ("metadata", "metadata.google.internal", "instance-data", "instance-data.ec2.internal")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NUMERIC_HOST = re.compile(r"^[0-9a-fA-FxX.]+$")
MAX_REDIRECTS = 5
PROBE_TIMEOUT = 10.0


class RefusedUrl(ValueError):
    """This URL may not be used as an input image; the message says why."""


def user_prefix(user_id: str) -> str:
    """The per-user folder of uploads: a digest, since user ids may hold any character."""
    return hashlib.sha256(user_id.encode()).hexdigest()[:20]


def upload_key(user_id: str, name: str) -> str:
    return f"uploads/{user_prefix(user_id)}/{name}"


def own_storage_key(url: str, settings: Settings) -> str | None:
    """The storage key if ``url`` points into our local storage, else ``None``."""
    base = settings.public_base_url.rstrip("/") + "/files/"
    return url[len(base) :] if url.startswith(base) else None


def literal_address(host: str) -> IPAddress | None:
    """``host`` as an IP address if it is one in any spelling ``inet_aton`` or IPv6 accept."""
    host = host.strip("[]").rstrip(".")
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    if _NUMERIC_HOST.match(host) and any(c.isdigit() for c in host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def why_not_public(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public address (``None`` when it is)."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = [ip.ipv4_mapped, ip.sixtofour, ip.teredo[1] if ip.teredo else None]
        if ip in _NAT64:
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        for inner in embedded:
            if inner is not None and (reason := why_not_public(inner)):
                return reason
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    for reason, flag in (
        ("a loopback address", ip.is_loopback),
        ("an unspecified address", ip.is_unspecified),
        ("a link-local address", ip.is_link_local),
        ("a multicast address", ip.is_multicast),
        ("a reserved address", ip.is_reserved),
        ("a private address", ip.is_private),
    ):
        if flag:
            return reason
    if not ip.is_global:
        return "not a public address"
    return None


def _trusted(netloc_host: str, port: int | None, settings: Settings) -> bool:
    trusted = {h.strip().lower() for h in settings.trusted_image_hosts.split(",") if h.strip()}
    return netloc_host.lower() in trusted or f"{netloc_host.lower()}:{port}" in trusted


async def check_public(url: str, settings: Settings) -> None:
    """Refuse ``url`` unless it is https on a public address (or on a trusted host)."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise RefusedUrl(f"is not a valid URL ({exc})") from None
    if not host:
        raise RefusedUrl("is not an absolute URL with a host")
    if parts.username or parts.password:
        raise RefusedUrl("must not carry a user name or password")
    if _trusted(host, port, settings):
        if parts.scheme not in ("http", "https"):
            raise RefusedUrl(f"uses the scheme {parts.scheme!r}; only https is accepted")
        return
    if parts.scheme != "https":
        raise RefusedUrl(f"uses the scheme {parts.scheme!r}; only https URLs (or your uploads) are accepted")
    if host.rstrip(".").lower() in METADATA_NAMES or host.rstrip(".").lower().endswith(".internal"):
        raise RefusedUrl(f"names {host}, a cloud metadata host")
    ip = literal_address(host)
    if ip is not None:
        if reason := why_not_public(ip):
            raise RefusedUrl(f"points to {ip}, {reason}")
        return
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(5):
            infos = await loop.getaddrinfo(host, port or 443, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError) as exc:
        raise RefusedUrl(f"has a host name that could not be resolved ({host}: {exc})") from None
    for info in infos:
        resolved = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if reason := why_not_public(resolved):
            raise RefusedUrl(f"has a host name, {host}, that resolves to {resolved}, {reason}")


def looks_like_image(head: bytes) -> bool:
    return head.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")) or (
        head[:4] == b"RIFF" and head[8:12] == b"WEBP"
    )


async def probe(url: str, settings: Settings, http: httpx.AsyncClient) -> None:
    """Fetch ``url`` following redirects by hand, checking every hop with ``check_public``;
    refuse it unless it ends in a 200 whose first bytes are a jpg, png or webp."""
    for _ in range(MAX_REDIRECTS + 1):
        await check_public(url, settings)
        try:
            async with asyncio.timeout(PROBE_TIMEOUT), http.stream("GET", url) as response:
                if response.is_redirect and "location" in response.headers:
                    url = urljoin(url, response.headers["location"])
                    continue
                if response.status_code != 200:
                    raise RefusedUrl(f"answered HTTP {response.status_code}, not an image")
                head = b""
                async for chunk in response.aiter_bytes():
                    head += chunk
                    if len(head) >= 16:
                        break
        except (httpx.HTTPError, TimeoutError) as exc:
            raise RefusedUrl(f"could not be fetched ({type(exc).__name__}: {exc})") from None
        if not looks_like_image(head[:16]):
            raise RefusedUrl("is not a jpg, png or webp image")
        return
    raise RefusedUrl(f"redirects more than {MAX_REDIRECTS} times")


async def check_input_url(
    url: str, user_id: str, settings: Settings, http: httpx.AsyncClient, storage: Storage | None = None
) -> None:
    """Refuse ``url`` (``RefusedUrl``) unless it is the caller's upload or a public image URL.
    ``storage`` recognises our own objects in any backend (a COS bucket's URLs, signed or not)."""
    key = storage.key_for_url(url) if storage is not None else None
    key = key or own_storage_key(url, settings)
    if key is None:
        await probe(url, settings, http)
        return
    match = UPLOAD_KEY.match(key)
    if match is None:
        raise RefusedUrl("is in our storage but is not an upload (POST /api/flux/upload-image)")
    if match["owner"] != user_prefix(user_id):
        raise RefusedUrl("is not one of your uploads")
    if settings.storage_backend == "local" and not await asyncio.to_thread(
        (settings.storage_dir / key).is_file
    ):
        raise RefusedUrl("names an upload that does not exist")


def _data_uri(path: Path) -> str:
    content_type = CONTENT_TYPES[path.suffix.lstrip(".")]
    return f"data:{content_type};base64,{base64.b64encode(path.read_bytes()).decode()}"


async def inline_own_uploads(urls: tuple[str, ...], settings: Settings) -> tuple[str, ...]:
    """``urls`` as fal can fetch them: our local uploads become data URIs, others stay.

    Raises ``FileNotFoundError`` when an upload is gone."""
    out = []
    for url in urls:
        key = own_storage_key(url, settings)
        if key is not None and UPLOAD_KEY.match(key):
            out.append(await asyncio.to_thread(_data_uri, settings.storage_dir / key))
        else:
            out.append(url)
    return tuple(out)
