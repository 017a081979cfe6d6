"""A persistent cache of LLM calls (SQLite): key = hash of the backend identity and the request; and the
failures of calls made through the Batch API, so a rerun retries each failed call as often as an
uninterrupted run would."""
from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

from moa.errors import UsageError


def cache_key(identity: dict, request_key: dict) -> str:
    blob = json.dumps({"backend": identity, "request": request_key}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class CallCache:
    """get/put reply text by key; every put is committed, so an interrupted run keeps its calls (WAL with
    synchronous=NORMAL: a commit survives a killed process without an fsync of its own)."""

    def __init__(self, path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path))
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("CREATE TABLE IF NOT EXISTS calls (key TEXT PRIMARY KEY, reply TEXT NOT NULL)")
            self.db.execute("CREATE TABLE IF NOT EXISTS failures (key TEXT NOT NULL, attempt TEXT NOT NULL, "
                            "error TEXT NOT NULL, PRIMARY KEY (key, attempt))")
            self.db.execute("SELECT COUNT(*) FROM calls").fetchone()
        except sqlite3.DatabaseError as err:
            self.db.close()
            raise UsageError(f"{path}: not a readable SQLite cache of LLM calls ({err}): delete it (its calls are "
                             f"made again) or pass --fresh") from None
        self.hits = self.misses = 0

    def get(self, key: str) -> str | None:
        row = self.db.execute("SELECT reply FROM calls WHERE key = ?", (key,)).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return row[0]

    def put(self, key: str, reply: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO calls (key, reply) VALUES (?, ?)", (key, reply))
        self.db.commit()

    def fail(self, key: str, attempt: str, error: str) -> None:
        """Record that the call `key` failed in `attempt` (a batch id): recording it again changes nothing."""
        self.db.execute("INSERT OR REPLACE INTO failures (key, attempt, error) VALUES (?, ?, ?)", (key, attempt, error))
        self.db.commit()

    def failures(self, key: str) -> list[str]:
        """The errors recorded for the call `key`, oldest first."""
        return [e for (e,) in self.db.execute("SELECT error FROM failures WHERE key = ? ORDER BY rowid", (key,))]

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]

    def close(self) -> None:
        self.db.close()
