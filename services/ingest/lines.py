"""``fluxpipe ingest``: other generators' items as JSON lines → ``HistoryItemRecorded`` events.

One JSON object a line (``IngestItem``); blank lines are skipped. Every line is validated
before anything is published: a file with one bad line publishes nothing and names the line.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator

from schemas.events import ExternalSource, HistoryItemRecorded, HistoryItemRecordedData, TaskStatus


class IngestItem(BaseModel):
    """One item of another generator, as its backend knows it."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    source: ExternalSource
    id: str = Field(min_length=1, max_length=64, description="the item's id in its generator")
    user_id: str = Field(min_length=1, max_length=255)
    status: TaskStatus = "SUCCESS"
    prompt: str | None = Field(None, max_length=20000)
    model: str | None = Field(None, max_length=100)
    image_url: str | None = Field(None, description="the generator's image URL")
    cloud_image_url: str | None = Field(None, description="our storage's copy, if any")
    created_at: AwareDatetime

    @field_validator("id", "user_id", "prompt", "model", "image_url", "cloud_image_url")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        if value is not None and "\x00" in value:
            raise ValueError("must not contain NUL characters (\\u0000)")
        return value

    def event(self) -> HistoryItemRecorded:
        return HistoryItemRecorded(
            task_id=self.id,
            user_id=self.user_id,
            data=HistoryItemRecordedData(
                source=self.source,
                status=self.status,
                model=self.model,
                prompt=self.prompt,
                image_url=self.image_url,
                cloud_image_url=self.cloud_image_url,
                created_at=self.created_at,
            ),
        )


class BadLine(ValueError):
    pass


def parse_lines(lines: Iterable[str]) -> list[HistoryItemRecorded]:
    """The events of every non-blank line; ``BadLine`` naming the first line that is wrong."""
    events = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            events.append(IngestItem.model_validate_json(line).event())
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise BadLine(f"line {number}: {where + ': ' if where else ''}{err['msg']}") from exc
    return events
