"""Where the simulator keeps its queue: one SQLite database in its data folder (or in memory).

Invariants:
- A request is written when it is submitted and again whenever its record changes (cancelled,
  outcome decided, webhook delivered), each write its own committed transaction, so a simulator
  stopped or killed at any moment restarts with every request it acknowledged and every outcome
  it reported. (WAL with synchronous=NORMAL: a process crash loses nothing committed; a power
  loss may lose the last transactions, which a simulator can afford.)
- Generated files are written before the outcome that names them.
- A request and its files are deleted together once fal's retention has passed.
- The webhook signing key is created once per data folder, so deliveries after a restart verify
  against the JWKS a receiver already cached.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (id TEXT PRIMARY KEY, expires_at REAL NOT NULL, record TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS requests_expires_at ON requests (expires_at);
CREATE TABLE IF NOT EXISTS files (
    request_id TEXT NOT NULL, name TEXT NOT NULL, content_type TEXT NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (request_id, name)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
"""


class Store:
    """Synchronous and small: every call is one short transaction on the event loop's thread."""

    def __init__(self, data_dir: Path | None) -> None:
        if data_dir is None:
            target = ":memory:"
        else:
            data_dir.mkdir(parents=True, exist_ok=True)
            target = str(data_dir / "queue.sqlite3")
        self._db = sqlite3.connect(target, check_same_thread=False, isolation_level=None)
        if data_dir is not None:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def save(self, request_id: str, expires_at: float, record: str) -> None:
        with self._db:
            self._db.execute(
                "INSERT INTO requests (id, expires_at, record) VALUES (?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET expires_at = excluded.expires_at, record = excluded.record",
                (request_id, expires_at, record),
            )

    def records(self) -> list[str]:
        """Every kept request, oldest submission first."""
        return [row[0] for row in self._db.execute("SELECT record FROM requests ORDER BY rowid")]

    def expire(self, now: float) -> list[str]:
        """Forget requests (and their files) whose retention ended before `now`; their ids."""
        with self._db:
            gone = [
                row[0] for row in self._db.execute("SELECT id FROM requests WHERE expires_at < ?", (now,))
            ]
            for request_id in gone:
                self._db.execute("DELETE FROM files WHERE request_id = ?", (request_id,))
                self._db.execute("DELETE FROM requests WHERE id = ?", (request_id,))
        return gone

    def put_files(self, request_id: str, files: dict[str, tuple[bytes, str]]) -> None:
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO files (request_id, name, content_type, data) VALUES (?, ?, ?, ?)",
                [(request_id, name, content_type, data) for name, (data, content_type) in files.items()],
            )

    def get_file(self, request_id: str, name: str) -> tuple[bytes, str] | None:
        row = self._db.execute(
            "SELECT data, content_type FROM files WHERE request_id = ? AND name = ?", (request_id, name)
        ).fetchone()
        return None if row is None else (bytes(row[0]), str(row[1]))

    def meta(self, key: str, create: bytes) -> bytes:
        """The value kept under `key`, storing `create` first if there is none."""
        with self._db:
            self._db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", (key, create))
            return bytes(self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])
