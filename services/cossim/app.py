"""A local Tencent COS: the parts of the XML object API fluxpipe's COS backend uses.

It speaks COS's wire protocol over real HTTP so the real SDK (cos-python-sdk-v5) can be tested
against it: PUT/GET/HEAD/DELETE Object, multipart (initiate, upload part, complete, abort) and
HEAD Bucket, with ``x-cos-meta-*`` metadata, ``Content-MD5`` checks (``BadDigest``) and COS's
XML error bodies.

Every request is authenticated as COS does it (``q-sign-algorithm=sha1`` signatures, in the
``Authorization`` header or a pre-signed URL's query): an unknown SecretId is
``InvalidAccessKeyId``, a signature made with another SecretKey or over a header or parameter
that was changed afterwards is ``SignatureDoesNotMatch``, a signature used outside its
``q-sign-time`` is ``AccessDenied`` ("Request has expired"), and temporary credentials need
their ``x-cos-security-token``. A public-read bucket serves GET/HEAD without a signature.

The signed ``host`` is compared without a port (the SDK signs the URL's hostname). The bucket
is the ``<bucket>.cos.<region>.myqcloud.com`` of the Host header, or, addressed by IP or a
custom domain, the one bucket this server holds.

Test hooks (same process): ``fail_next`` answers the next requests with a 5xx, ``stall_next``
delays them (to make the client time out); ``requests`` records what was asked.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

SIGNED_HEADERS_ALWAYS = ("host",)


@dataclass
class Credential:
    secret_key: str
    token: str | None = None


@dataclass
class StoredObject:
    data: bytes
    content_type: str
    metadata: dict[str, str]
    etag: str


@dataclass
class Fault:
    methods: frozenset[str]
    status: int = 503
    delay: float = 0.0


@dataclass
class CosSimulator:
    """One bucket and the credentials allowed to use it."""

    bucket: str
    region: str
    credentials: dict[str, Credential]
    public_read: bool = False
    objects: dict[str, StoredObject] = field(default_factory=dict)
    uploads: dict[str, dict[int, bytes]] = field(default_factory=dict)
    _pending_meta: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    requests: list[tuple[str, str, int]] = field(default_factory=list)

    def fail_next(self, count: int, status: int = 503, methods: str = "PUT POST") -> None:
        self.faults.extend(Fault(frozenset(methods.split()), status=status) for _ in range(count))

    def stall_next(self, count: int, seconds: float, methods: str = "PUT POST") -> None:
        self.faults.extend(Fault(frozenset(methods.split()), status=0, delay=seconds) for _ in range(count))

    def count(self, method: str, status: int | None = None) -> int:
        return sum(1 for m, _, s in self.requests if m == method and (status is None or s == status))

    def app(self) -> Starlette:
        return Starlette(
            routes=[Route("/{key:path}", self.handle, methods=["GET", "HEAD", "PUT", "POST", "DELETE"])]
        )

    async def handle(self, request: Request) -> Response:
        try:
            response = await self._answer(request)
        except ClientDisconnect:
            response = Response(status_code=499)  # the client gave up (timed out) first
        self.requests.append((request.method, request.url.path, response.status_code))
        return response

    async def _answer(self, request: Request) -> Response:
        key = request.scope["path"].lstrip("/")
        fault = next((f for f in self.faults if request.method in f.methods), None)
        if fault is not None:
            self.faults.remove(fault)
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.status:
                await request.body()
                return self.error(request, fault.status, "InternalError", "We encountered an internal error.")
        host = request.headers.get("host", "").split(":")[0]
        if host.endswith(".myqcloud.com") and host.split(".")[0] != self.bucket:
            return self.error(request, 404, "NoSuchBucket", "The specified bucket does not exist.")
        anonymous_read = self.public_read and request.method in ("GET", "HEAD") and key
        if not anonymous_read or _auth_of(request):
            refused = self.authenticate(request)
            if refused is not None:
                return refused
        if not key:
            return self.bucket_answer(request)
        params = request.query_params
        match request.method:
            case "PUT" if "partNumber" in params and "uploadId" in params:
                return await self.upload_part(request, params["uploadId"], int(params["partNumber"]))
            case "PUT":
                body = await request.body()
                if not _digest_matches(request, body):
                    return self.error(
                        request,
                        400,
                        "BadDigest",
                        "The Content-MD5 you specified did not match what we received.",
                    )
                obj = StoredObject(
                    body,
                    request.headers.get("content-type", "application/octet-stream"),
                    _meta(request),
                    _etag(body),
                )
                self.objects[key] = obj
                return _answer(None, 200, self._ids() | {"ETag": obj.etag})
            case "POST" if "uploads" in params:
                upload_id = uuid.uuid4().hex
                self.uploads[upload_id] = {}
                self._pending_meta[upload_id] = (request.headers.get("content-type", ""), _meta(request))
                return _xml(
                    "InitiateMultipartUploadResult",
                    {"Bucket": self.bucket, "Key": key, "UploadId": upload_id},
                    self._ids(),
                )
            case "POST" if "uploadId" in params:
                return await self.complete(request, key, params["uploadId"])
            case "DELETE" if "uploadId" in params:
                self.uploads.pop(params["uploadId"], None)
                return _answer(None, 204, self._ids())
            case "DELETE":
                self.objects.pop(key, None)
                return _answer(None, 204, self._ids())
            case "GET" | "HEAD":
                found = self.objects.get(key)
                if found is None:
                    return self.error(request, 404, "NoSuchKey", "The specified key does not exist.")
                headers = (
                    self._ids() | found.metadata | {"ETag": found.etag, "Content-Type": found.content_type}
                )
                if request.method == "HEAD":
                    headers["Content-Length"] = str(len(found.data))
                    return _answer(None, 200, headers)
                return _answer(found.data, 200, headers)
        return self.error(request, 405, "MethodNotAllowed", "The specified method is not allowed.")

    def bucket_answer(self, request: Request) -> Response:
        if request.method == "HEAD":
            return _answer(None, 200, self._ids())
        return self.error(request, 405, "MethodNotAllowed", "The specified method is not allowed.")

    async def upload_part(self, request: Request, upload_id: str, number: int) -> Response:
        parts = self.uploads.get(upload_id)
        if parts is None:
            return self.error(request, 404, "NoSuchUpload", "The specified upload does not exist.")
        body = await request.body()
        if not _digest_matches(request, body):
            return self.error(
                request, 400, "BadDigest", "The Content-MD5 you specified did not match what we received."
            )
        parts[number] = body
        return _answer(None, 200, self._ids() | {"ETag": _etag(body)})

    async def complete(self, request: Request, key: str, upload_id: str) -> Response:
        parts = self.uploads.get(upload_id)
        if parts is None:
            return self.error(request, 404, "NoSuchUpload", "The specified upload does not exist.")
        listed = ET.fromstring(await request.body())
        numbers = [int(p.findtext("PartNumber") or 0) for p in listed.iter("Part")]
        etags = [p.findtext("ETag") for p in listed.iter("Part")]
        if not numbers or numbers != sorted(numbers) or any(n not in parts for n in numbers):
            return self.error(
                request, 400, "InvalidPart", "One or more of the specified parts could not be found."
            )
        if any(_etag(parts[n]) != e for n, e in zip(numbers, etags, strict=True)):
            return self.error(request, 400, "InvalidPart", "The ETag of a part does not match.")
        if any(len(parts[n]) < 1024 * 1024 for n in numbers[:-1]):
            return self.error(
                request, 400, "EntityTooSmall", "Your proposed upload is smaller than the minimum."
            )
        data = b"".join(parts[n] for n in numbers)
        content_type, metadata = self._pending_meta.pop(upload_id, ("application/octet-stream", {}))
        etag = f'"{hashlib.md5(data).hexdigest()}-{len(numbers)}"'
        self.objects[key] = StoredObject(data, content_type or "application/octet-stream", metadata, etag)
        del self.uploads[upload_id]
        return _xml(
            "CompleteMultipartUploadResult",
            {"Location": f"{self.host}/{key}", "Bucket": self.bucket, "Key": key, "ETag": etag},
            self._ids(),
        )

    @property
    def host(self) -> str:
        return f"{self.bucket}.cos.{self.region}.myqcloud.com"

    def authenticate(self, request: Request) -> Response | None:
        """``None`` when the request carries a valid COS signature; else COS's refusal."""
        auth = _auth_of(request)
        if not auth:
            return self.error(request, 403, "AccessDenied", "Access Denied.")
        fields = dict(part.split("=", 1) for part in auth.split("&") if "=" in part)
        if fields.get("q-sign-algorithm") != "sha1" or not all(
            name in fields for name in ("q-ak", "q-sign-time", "q-key-time", "q-signature")
        ):
            return self.error(request, 403, "AccessDenied", "The authorization is malformed.")
        credential = self.credentials.get(fields["q-ak"])
        if credential is None:
            return self.error(
                request,
                403,
                "InvalidAccessKeyId",
                "The Access Key Id you provided does not exist in our records.",
            )
        try:
            start, end = (int(t) for t in fields["q-sign-time"].split(";"))
        except ValueError:
            return self.error(request, 403, "AccessDenied", "The q-sign-time is malformed.")
        now = time.time()
        if now > end:
            return self.error(request, 403, "AccessDenied", "Request has expired")
        if now < start - 900:
            return self.error(
                request,
                403,
                "RequestTimeTooSkewed",
                "The difference between the request time and the server's time is too large.",
            )
        if credential.token is not None:
            token = request.headers.get("x-cos-security-token") or request.query_params.get(
                "x-cos-security-token"
            )
            if token != credential.token:
                return self.error(
                    request, 403, "InvalidToken", "The provided token is malformed or otherwise invalid."
                )
        header_names = [h for h in fields.get("q-header-list", "").split(";") if h]
        param_names = [p for p in fields.get("q-url-param-list", "").split(";") if p]
        headers = {k.lower(): v for k, v in request.headers.items()}
        headers["host"] = headers.get("host", "").split(":")[0]
        query = {k.lower(): v for k, v in request.query_params.items()}
        if any(h not in headers for h in header_names) or any(p not in query for p in param_names):
            return self.error(
                request, 403, "SignatureDoesNotMatch", "The Signature you specified is invalid."
            )
        format_str = "\n".join(
            [
                request.method.lower(),
                request.scope["path"],
                "&".join(f"{p}={_enc(query[p])}" for p in sorted(param_names)),
                "&".join(f"{h}={_enc(headers[h])}" for h in sorted(header_names)),
                "",
            ]
        )
        string_to_sign = f"sha1\n{fields['q-sign-time']}\n{hashlib.sha1(format_str.encode()).hexdigest()}\n"
        sign_key = hmac.new(
            credential.secret_key.encode(), fields["q-key-time"].encode(), hashlib.sha1
        ).hexdigest()
        expected = hmac.new(sign_key.encode(), string_to_sign.encode(), hashlib.sha1).hexdigest()
        if not hmac.compare_digest(expected, fields["q-signature"]):
            return self.error(
                request, 403, "SignatureDoesNotMatch", "The Signature you specified is invalid."
            )
        return None

    def _ids(self) -> dict[str, str]:
        return {"x-cos-request-id": uuid.uuid4().hex, "Server": "tencent-cos"}

    def error(self, request: Request, status: int, code: str, message: str) -> Response:
        ids = self._ids()
        body = (
            "<?xml version='1.0' encoding='utf-8' ?>\n<Error>\n"
            f"\t<Code>{code}</Code>\n\t<Message>{message}</Message>\n"
            f"\t<Resource>{self.host}{request.url.path}</Resource>\n"
            f"\t<RequestId>{ids['x-cos-request-id']}</RequestId>\n\t<TraceId>{uuid.uuid4().hex}</TraceId>\n"
            "</Error>"
        )
        if request.method == "HEAD":
            return _answer(None, status, ids)
        return _answer(body, status, ids, "application/xml")


def _auth_of(request: Request) -> str:
    header = request.headers.get("authorization", "")
    if header:
        return header
    if "q-signature" in request.query_params:
        return "&".join(f"{k}={v}" for k, v in request.query_params.items() if k.startswith("q-"))
    return ""


def _enc(value: str) -> str:
    return quote(value.encode(), safe="-_.~")


def _meta(request: Request) -> dict[str, str]:
    return {k.lower(): v for k, v in request.headers.items() if k.lower().startswith("x-cos-meta-")}


def _digest_matches(request: Request, body: bytes) -> bool:
    """No ``Content-MD5``, or one that is the body's."""
    claimed = request.headers.get("content-md5")
    return claimed is None or claimed == base64.b64encode(hashlib.md5(body).digest()).decode()


def _etag(data: bytes) -> str:
    return f'"{hashlib.md5(data).hexdigest()}"'


def _xml(root: str, fields: dict[str, str], headers: dict[str, str]) -> Response:
    inner = "".join(f"<{k}>{v}</{k}>" for k, v in fields.items())
    return _answer(f"<{root}>{inner}</{root}>", 200, headers, "application/xml")


def _answer(
    body: bytes | str | None, status: int, headers: dict[str, str], media_type: str | None = None
) -> Response:
    """A response whose header names keep their case (``ETag``), as COS sends them: the SDK
    reads them from a plain dict."""
    response = Response(body, status_code=status, media_type=media_type)
    named = {k.lower() for k in headers}
    response.raw_headers = [(k, v) for k, v in response.raw_headers if k.decode() not in named] + [
        (k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()
    ]
    if body is None and "content-length" in named:
        response.raw_headers = [
            (k, v) for k, v in response.raw_headers if k != b"content-length" or v != b"0"
        ]
    return response
