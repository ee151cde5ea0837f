"""``POST /api/flux/image-to-image``: every mode that takes input images.

The body is validated against the chosen model's parameter model (``schemas.catalog``) and
every input URL is checked (``services.common.urls``) before anything is published; a refused
job never reaches the log. An accepted one goes through ``accept_job``, the same path as
text-to-image (task id, idempotency, publishing).
"""

from __future__ import annotations

from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Body, Header, Request, Response, status
from fastapi.exceptions import RequestValidationError

from schemas.api import InvalidJob, TaskAccepted, parse_image_job
from schemas.catalog import MODELS, params_model
from schemas.events import TaskRequestedData
from services.common.urls import RefusedUrl, check_input_url
from services.gateway.deps import BusDep, CurrentUser, EngineDep, SettingsDep, StorageDep
from services.gateway.routes.flux import accept_job

router = APIRouter(prefix="/api/flux", tags=["flux"])

_BODY_SCHEMA = {
    "oneOf": [
        {
            **params_model(spec).model_json_schema(),
            "properties": {
                "model": {"const": spec.id},
                **params_model(spec).model_json_schema()["properties"],
            },
        }
        for spec in MODELS.values()
        if spec.needs_image
    ]
}


@router.post(
    "/image-to-image",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=TaskAccepted,
    openapi_extra={"requestBody": {"content": {"application/json": {"schema": _BODY_SCHEMA}}}},
)
async def image_to_image(
    body: Annotated[Any, Body(include_in_schema=False)],
    user: CurrentUser,
    bus: BusDep,
    engine: EngineDep,
    settings: SettingsDep,
    response: Response,
    request: Request,
    storage: StorageDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> TaskAccepted:
    """Queue a job on an image model (image-to-image, redux, kontext edit, multi-image edit).

    ``model`` picks the model (``GET /api/flux/models`` lists them with their parameters);
    images go in ``image_url``, or ``image_urls`` for the multi models.
    """
    try:
        spec, params = parse_image_job(body)
    except InvalidJob as exc:
        raise RequestValidationError(exc.errors) from None
    fields = params.model_dump()
    urls: list[str] = fields.pop("image_urls", None) or [fields.pop("image_url")]
    errors = []
    async with httpx.AsyncClient(
        follow_redirects=False, trust_env=False, timeout=httpx.Timeout(10, connect=5)
    ) as http:
        for index, url in enumerate(urls):
            try:
                await check_input_url(url, user.user_id, settings, http, storage)
            except RefusedUrl as exc:
                multi = "image_urls" in params.model_fields
                loc = ("body", "image_urls", index) if multi else ("body", "image_url")
                errors.append({"loc": loc, "msg": f"the URL {exc}", "type": "url_refused"})
    if errors:
        raise RequestValidationError(errors)
    # our own objects go into the log by their permanent address, never as a signed URL (the
    # submitter signs them afresh when it hands them to fal)
    urls = [storage.object_url(key) if (key := storage.key_for_url(url)) else url for url in urls]
    data = TaskRequestedData(model=spec.id, task_type=spec.task_type, image_urls=tuple(urls), **fields)
    return await accept_job(request, data, user, bus, engine, settings, response, idempotency_key)
