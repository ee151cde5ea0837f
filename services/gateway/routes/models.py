"""``GET /api/flux/models``: the catalog as a frontend needs it to draw its controls."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from schemas.api import ModelInfo, model_info
from schemas.catalog import MODELS, Mode

router = APIRouter(prefix="/api/flux", tags=["models"])


@router.get("/models", response_model=list[ModelInfo])
async def list_models(
    mode: Annotated[Mode | None, Query(description="only the models of this mode")] = None,
) -> list[ModelInfo]:
    """The eleven models: mode, input images, and each one's parameter schema (no token needed)."""
    return [model_info(spec) for spec in MODELS.values() if mode is None or spec.mode is mode]
