"""The registry of read models ``fluxpipe replay`` can rebuild: their tables and their fold.

A read model is registered once with ``register``: the tables it fills, the live
projector checkpoint that says how far they are applied, and a factory for an in-memory
``Rebuild`` that folds events (stream order) into rows. Another read model (credits,
configuration, other generators' history) registers itself the same way, in its own module,
imported at the end of this one.

Invariants:
- A ``Rebuild`` folds with the same pure functions the live projector uses, so a replay
  equals what the live projector built (the test compares them row by row).
- ``rows()`` gives every row once (for the bulk load); ``changes()`` the rows changed since
  its last call (for catching up with events that arrived during the load), keyed by the
  table's ``keys`` so they can be upserted.
- Columns a row leaves out take the table's default (``image_history.id``).
- A replay swaps whole tables: every row of a rebuilt table must come from some registered
  read model. A table that several read models fill (``image_history``: Flux tasks here, other
  generators' history elsewhere) gets the rows of each of them, so each source must register
  its fold for it (with the same key columns), or its rows are lost at the swap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from schemas.events import FluxEvent, ImagesStored
from services.projector.projection import CHECKPOINT, fold_task, history_entry

Row = dict[str, Any]


class Rebuild(Protocol):
    def fold(self, seq: int, event: FluxEvent) -> None: ...

    def rows(self, table: str) -> Iterable[Row]: ...

    def changes(self, table: str) -> list[Row]: ...


@dataclass(frozen=True)
class ReadModel:
    """One read model: ``keys`` maps each of its tables to the columns that identify a row."""

    name: str
    keys: dict[str, tuple[str, ...]]
    checkpoint: str
    rebuild: Callable[[], Rebuild]

    @property
    def tables(self) -> tuple[str, ...]:
        return tuple(self.keys)


READ_MODELS: dict[str, ReadModel] = {}


def register(model: ReadModel) -> ReadModel:
    READ_MODELS[model.name] = model
    return model


class FluxTasksRebuild:
    """``flux_tasks`` and the Flux rows of ``image_history``, as ``apply_batch`` folds them."""

    def __init__(self) -> None:
        self.tasks: dict[str, Row] = {}
        self.history: dict[str, Row] = {}
        self.dirty_tasks: set[str] = set()
        self.dirty_history: set[str] = set()

    def fold(self, seq: int, event: FluxEvent) -> None:
        before = self.tasks.get(event.task_id)
        after = fold_task(before, seq, event)
        if after is None or after is before:
            return
        self.tasks[event.task_id] = after
        self.dirty_tasks.add(event.task_id)
        if isinstance(event, ImagesStored) and event.task_id not in self.history:
            self.history[event.task_id] = history_entry(after)
            self.dirty_history.add(event.task_id)

    def rows(self, table: str) -> Iterable[Row]:
        self.dirty_tasks.clear()
        self.dirty_history.clear()
        return self.tasks.values() if table == "flux_tasks" else self.history.values()

    def changes(self, table: str) -> list[Row]:
        if table == "flux_tasks":
            changed, self.dirty_tasks = self.dirty_tasks, set()
            return [self.tasks[k] for k in changed]
        changed, self.dirty_history = self.dirty_history, set()
        return [self.history[k] for k in changed]


register(
    ReadModel(
        name="flux_tasks",
        keys={"flux_tasks": ("id",), "image_history": ("source", "source_task_id")},
        checkpoint=CHECKPOINT,
        rebuild=FluxTasksRebuild,
    )
)
