"""A small durable local spool for messages accepted while Redis is unreachable.

Twilio does not retry an SMS webhook by default, so answering 503 during a
Redis outage would lose the message. Instead the web app writes the verified
webhook to SQLite, answers Twilio normally, and drains the spool into Redis
when it is back. Replaying is safe: everything downstream is idempotent per
MessageSid (the job's idempotency key, per-part send records).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path


class InboundSpool:
    """Accepted inbound messages waiting for Redis, in one SQLite file."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a spooled message survives a crash
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS inbound (id INTEGER PRIMARY KEY, channel TEXT NOT NULL,"
            " payload TEXT NOT NULL, created REAL NOT NULL)"
        )
        self._db.commit()

    def put(self, channel: str, payload: dict[str, str]) -> None:
        """Keep one message until it reaches Redis."""
        with self._lock:
            self._db.execute(
                "INSERT INTO inbound (channel, payload, created) VALUES (?, ?, ?)",
                (channel, json.dumps(payload), time.time()),
            )
            self._db.commit()

    def pending(
        self, kinds: tuple[str, ...] | None = None, limit: int = 100
    ) -> list[tuple[int, str, dict[str, str]]]:
        """The oldest waiting messages (of `kinds` only, when given)."""
        return [(item_id, kind, payload)
                for item_id, kind, payload, _ in self.pending_since(kinds, limit)]  # fmt: skip

    def pending_since(
        self, kinds: tuple[str, ...] | None = None, limit: int = 100
    ) -> list[tuple[int, str, dict[str, str], float]]:
        """The oldest waiting messages (of `kinds` only, when given: items of a kind no one
        drains never hold up the others), each with the time it was accepted."""
        query = "SELECT id, channel, payload, created FROM inbound"
        arguments: tuple[str, ...] = ()
        if kinds is not None:
            query += f" WHERE channel IN ({','.join('?' * len(kinds))})"
            arguments = kinds
        with self._lock:
            rows = self._db.execute(f"{query} ORDER BY id LIMIT ?", (*arguments, limit)).fetchall()
        return [(row[0], row[1], json.loads(row[2]), float(row[3])) for row in rows]

    def remove(self, item_id: int) -> None:
        """Forget a message that reached Redis."""
        with self._lock:
            self._db.execute("DELETE FROM inbound WHERE id = ?", (item_id,))
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM inbound").fetchone()[0])

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._db.close()
