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
- A read model ``by_task`` has every row depend only on the events of one task token (the
  subject token after ``task.``, or after ``history.<source>.``) and is left unchanged by
  events on other subjects. A replay may then fold the log in partitions by that token, in
  parallel processes, and ``merge`` the partitions' rebuilds into one (a union: no key is
  in two partitions).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from schemas.events import FluxEvent
from services.projector.history import COLUMNS as HISTORY_COLUMNS
from services.projector.history import Key, fold_history, key_of
from services.projector.projection import CHECKPOINT, fold_task

Row = dict[str, Any]


class Rebuild(Protocol):
    def fold(self, seq: int, event: FluxEvent) -> None: ...

    def rows(self, table: str) -> Iterable[Row]: ...

    def changes(self, table: str) -> list[Row]: ...

    def merge(self, other: Any) -> None: ...


@dataclass(frozen=True)
class ReadModel:
    """One read model: ``keys`` maps each of its tables to the columns that identify a row."""

    name: str
    keys: dict[str, tuple[str, ...]]
    checkpoint: str
    rebuild: Callable[[], Rebuild]
    by_task: bool = False

    @property
    def tables(self) -> tuple[str, ...]:
        return tuple(self.keys)


READ_MODELS: dict[str, ReadModel] = {}


def register(model: ReadModel) -> ReadModel:
    READ_MODELS[model.name] = model
    return model


class FluxTasksRebuild:
    """``flux_tasks`` and every row of ``image_history`` (Flux tasks and the other generators'
    items), folded event by event exactly as ``apply_batch`` and ``apply_history`` do."""

    def __init__(self) -> None:
        self.tasks: dict[str, Row] = {}
        self.history: dict[Key, Row] = {}
        self.dirty_tasks: set[str] = set()
        self.dirty_history: set[Key] = set()

    def fold(self, seq: int, event: FluxEvent) -> None:
        before = self.tasks.get(event.task_id)
        after = fold_task(before, seq, event)
        produced = None
        if after is not None and after is not before:
            self.tasks[event.task_id] = after
            self.dirty_tasks.add(event.task_id)
            produced = after
        key = key_of(event)
        current = self.history.get(key)
        row = fold_history(current, seq, event, produced)
        if row is not None and row is not current:
            self.history[key] = row
            self.dirty_history.add(key)

    def merge(self, other: FluxTasksRebuild) -> None:
        """Take in the rows of another partition of the log (disjoint tasks and items)."""
        self.tasks.update(other.tasks)
        self.history.update(other.history)
        self.dirty_tasks |= other.dirty_tasks
        self.dirty_history |= other.dirty_history

    def rows(self, table: str) -> Iterable[Row]:
        self.dirty_tasks.clear()
        self.dirty_history.clear()
        if table == "flux_tasks":
            return self.tasks.values()
        return ({name: row.get(name) for name in HISTORY_COLUMNS} for row in self.history.values())

    def changes(self, table: str) -> list[Row]:
        if table == "flux_tasks":
            changed, self.dirty_tasks = self.dirty_tasks, set()
            return [self.tasks[k] for k in changed]
        keys, self.dirty_history = self.dirty_history, set()
        return [{name: self.history[k].get(name) for name in HISTORY_COLUMNS} for k in keys]


register(
    ReadModel(
        name="flux_tasks",
        keys={"flux_tasks": ("id",), "image_history": ("source", "source_task_id")},
        checkpoint=CHECKPOINT,
        rebuild=FluxTasksRebuild,
        by_task=True,  # rows keyed by task id and (source, item id), both the subject's token
    )
)
