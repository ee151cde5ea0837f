"""Reading one file out of a multipart body without ever holding more than the limit.

Starlette's form parsing spools a whole body to disk before a route sees it, so a 2 GB upload
would fill the disk before we could refuse it. Here the body is fed chunk by chunk into
python-multipart's streaming parser: ``Content-Length`` is checked before anything is read,
the bytes received are counted as they arrive, and the answer is 413 as soon as the file (or
the body around it) passes the limit. Only the named field's bytes are kept, in memory, and
never more than the limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import HTTPException, Request, status
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

BODY_OVERHEAD = 64 * 1024  # part headers, boundaries and small fields around the file


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    name: str | None = None
    filename: str | None = None


@dataclass
class ReceivedFile:
    data: bytes
    filename: str | None


def _too_large(limit: int) -> HTTPException:
    return HTTPException(
        status.HTTP_413_CONTENT_TOO_LARGE,
        f"the file is larger than {limit // (1024 * 1024)} MB ({limit} bytes)",
    )


async def read_file_field(request: Request, field_name: str, limit: int) -> ReceivedFile:
    """The bytes and file name of the multipart field ``field_name``, at most ``limit`` bytes."""
    mime, options = parse_options_header(request.headers.get("content-type"))
    boundary = options.get(b"boundary")
    if mime != b"multipart/form-data" or not boundary:
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            f"send the image as multipart/form-data with a field named {field_name!r}",
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit + BODY_OVERHEAD:
        raise _too_large(limit)

    parts: list[_Part] = []
    header_field = bytearray()
    header_value = bytearray()
    data = bytearray()
    overflow = False

    def on_part_begin() -> None:
        parts.append(_Part())

    def on_header_field(buf: bytes, start: int, end: int) -> None:
        header_field.extend(buf[start:end])

    def on_header_value(buf: bytes, start: int, end: int) -> None:
        header_value.extend(buf[start:end])

    def on_header_end() -> None:
        parts[-1].headers[bytes(header_field).lower()] = bytes(header_value)
        header_field.clear()
        header_value.clear()

    def on_headers_finished() -> None:
        part = parts[-1]
        _, disposition = parse_options_header(part.headers.get(b"content-disposition"))
        if b"name" in disposition:
            part.name = disposition[b"name"].decode("utf-8", "replace")
        if b"filename" in disposition:
            part.filename = disposition[b"filename"].decode("utf-8", "replace")

    def on_part_data(buf: bytes, start: int, end: int) -> None:
        nonlocal overflow
        if parts[-1].name != field_name or overflow:
            return
        if len(data) + (end - start) > limit:
            overflow = True
            return
        data.extend(buf[start:end])

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
        },
    )
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit + BODY_OVERHEAD:
                raise _too_large(limit)
            parser.write(chunk)
            if overflow:
                raise _too_large(limit)
        parser.finalize()
    except MultipartParseError as exc:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"the multipart body is malformed: {exc}"
        ) from None
    found = [p for p in parts if p.name == field_name]
    if not found:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"{field_name}: Field required (a multipart file field)"
        )
    return ReceivedFile(bytes(data), found[0].filename)
