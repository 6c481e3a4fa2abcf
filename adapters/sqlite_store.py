"""The default `EventStore` (agent_dpo/store.py): one SQLite file in WAL mode under the store directory.
Ingest writes a batch per transaction; pairing, status and the CLI read calls back from it.

The SQL is deliberately plain (two tables, two secondary indexes, `INSERT ... ON CONFLICT`, `GROUP BY`)
so a server database can implement the same port with the same statements:

- `events`: one row per accepted event, primary key (tenant_id, event_id). The original payload bytes
  are kept; calls are assembled from them on read, so a fix in call assembly applies to old data too.
  On a duplicate event_id the row from the lowest stream sequence wins, so the stored state never
  depends on the order redeliveries happen to arrive in.
- `dead_letters`: messages that broke the contract (or could not be stored), unique on stream sequence
  so a crash-replay records each once. The bytes themselves live in the dead-letter stream.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from itertools import groupby
from pathlib import Path
from typing import Self

from agent_dpo.calls import Call, StoredEvent, assemble_call
from agent_dpo.events import Event, parse_event, subject_for
from agent_dpo.store import AgentStatus, DeadLetter, WriteResult

SCHEMA_VERSION = 1
STORE_FILE = "events.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    tenant_id TEXT NOT NULL,
    event_id  TEXT NOT NULL,
    agent_id  TEXT NOT NULL,
    call_id   TEXT NOT NULL,
    type      TEXT NOT NULL,
    ts        TEXT NOT NULL,      -- the envelope's ts, as sent
    seq       INTEGER NOT NULL,   -- JetStream stream sequence
    payload   BLOB NOT NULL,      -- the original bytes
    PRIMARY KEY (tenant_id, event_id)
);
-- calls of one agent in call_id order, one query for the whole agent (pairs export)
CREATE INDEX IF NOT EXISTS events_by_call ON events (tenant_id, agent_id, call_id, seq);
-- status counts and `complete_only` (which calls have call.ended) without touching payloads
CREATE INDEX IF NOT EXISTS events_by_type ON events (tenant_id, agent_id, type, call_id);
CREATE TABLE IF NOT EXISTS dead_letters (
    id           INTEGER PRIMARY KEY,
    stream_seq   INTEGER UNIQUE,
    subject      TEXT NOT NULL,
    dlq_subject  TEXT NOT NULL,
    code         TEXT NOT NULL,
    reason       TEXT NOT NULL,
    tenant_id    TEXT,
    agent_id     TEXT,
    payload_size INTEGER NOT NULL,
    recorded_at  REAL NOT NULL
);
"""

_INSERT_EVENT = """
INSERT INTO events (tenant_id, event_id, agent_id, call_id, type, ts, seq, payload)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (tenant_id, event_id) DO UPDATE SET
    agent_id = excluded.agent_id, call_id = excluded.call_id, type = excluded.type,
    ts = excluded.ts, seq = excluded.seq, payload = excluded.payload
WHERE excluded.seq < events.seq
"""

_INSERT_DEAD_LETTER = """
INSERT INTO dead_letters (stream_seq, subject, dlq_subject, code, reason, tenant_id, agent_id,
                          payload_size, recorded_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (stream_seq) DO NOTHING
"""

# Dead letters whose subject did not parse are counted under this pseudo agent in `status()`.
UNKNOWN = "_unknown"


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: another process holds the write lock, or the disk is briefly unavailable."""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    text = str(exc).lower()
    return any(s in text for s in ("locked", "busy", "disk i/o", "unable to open"))


class SqliteStore:
    """One connection, safe to use from one thread at a time (ingest writes from a worker thread)."""

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 5.0, synchronous: str = "FULL"):
        path = Path(path)
        if path.suffix == "" or path.is_dir():
            path = path / STORE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE per batch).
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                   timeout=busy_timeout_s)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed batch survives power loss, which matters because its messages are acked next.
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.executescript(_SCHEMA)
        self._db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                         (str(SCHEMA_VERSION),))

    # ---- writes -----------------------------------------------------------------------------------

    def write_batch(self, events: Sequence[StoredEvent], dead_letters: Sequence[DeadLetter] = ()) -> WriteResult:
        rows = [(s.event.tenant_id, s.event.event_id, s.event.agent_id, s.event.call_id, s.event.type,
                 s.event.ts_text, s.seq, s.event.payload) for s in events]
        now = time.time()
        dl_rows = [(d.stream_seq, d.subject, d.dlq_subject, d.code, d.reason, d.tenant_id, d.agent_id,
                    d.payload_size, now) for d in dead_letters]
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                before = db.total_changes
                if rows:
                    db.executemany(_INSERT_EVENT, rows)
                inserted = db.total_changes - before
                if dl_rows:
                    db.executemany(_INSERT_DEAD_LETTER, dl_rows)
                recorded = db.total_changes - before - inserted
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        return WriteResult(inserted=inserted, duplicates=len(rows) - inserted, dead_letters=recorded)

    # ---- reads ------------------------------------------------------------------------------------

    def agents(self) -> list[tuple[str, str]]:
        with self._lock:
            return [tuple(r) for r in self._db.execute(
                "SELECT DISTINCT tenant_id, agent_id FROM events ORDER BY tenant_id, agent_id")]

    def calls(self, tenant_id: str, agent_id: str, *, complete_only: bool = False) -> Iterator[Call]:
        """All calls of one agent in call_id order, streamed from one query (no query per call)."""
        sql = "SELECT call_id, type, seq, payload FROM events WHERE tenant_id = ? AND agent_id = ?"
        params: tuple = (tenant_id, agent_id)
        if complete_only:
            sql += (" AND call_id IN (SELECT call_id FROM events"
                    " WHERE tenant_id = ? AND agent_id = ? AND type = 'call.ended')")
            params += (tenant_id, agent_id)
        sql += " ORDER BY call_id, seq"
        # A separate cursor: the generator may be consumed slowly while ingest writes (WAL readers
        # do not block the writer and see one consistent snapshot).
        with self._lock:
            cursor = self._db.execute(sql, params)
        try:
            for _call_id, rows in groupby(_fetch_all(cursor, self._lock), key=lambda r: r[0]):
                yield assemble_call(self._stored(tenant_id, agent_id, r[1], r[2], r[3]) for r in rows)
        finally:
            cursor.close()

    def call(self, tenant_id: str, agent_id: str, call_id: str) -> Call | None:
        with self._lock:
            rows = self._db.execute(
                "SELECT type, seq, payload FROM events WHERE tenant_id = ? AND agent_id = ? AND call_id = ?"
                " ORDER BY seq", (tenant_id, agent_id, call_id)).fetchall()
        if not rows:
            return None
        return assemble_call(self._stored(tenant_id, agent_id, *r) for r in rows)

    def status(self) -> list[AgentStatus]:
        by_agent: dict[tuple[str, str], AgentStatus] = {}

        def entry(tenant: str | None, agent: str | None) -> AgentStatus:
            key = (tenant or UNKNOWN, agent or UNKNOWN)
            if key not in by_agent:
                by_agent[key] = AgentStatus(*key)
            return by_agent[key]

        with self._lock:
            per_type = self._db.execute(
                "SELECT tenant_id, agent_id, type, count(*), count(DISTINCT call_id) FROM events"
                " GROUP BY tenant_id, agent_id, type").fetchall()
            per_agent = self._db.execute(
                "SELECT tenant_id, agent_id, count(DISTINCT call_id), max(seq) FROM events"
                " GROUP BY tenant_id, agent_id").fetchall()
            dead = self._db.execute(
                "SELECT tenant_id, agent_id, count(*) FROM dead_letters GROUP BY tenant_id, agent_id").fetchall()
        for tenant, agent, etype, n, calls in per_type:
            st = entry(tenant, agent)
            st.events += n
            if etype == "call.ended":
                st.complete_calls = calls
            elif etype.startswith("feedback."):
                st.feedback[etype.split(".", 1)[1]] = n
        for tenant, agent, calls, last_seq in per_agent:
            st = entry(tenant, agent)
            st.calls, st.last_seq = calls, last_seq
        for tenant, agent, n in dead:
            entry(tenant, agent).dead_letters += n
        return [by_agent[k] for k in sorted(by_agent)]

    def event_range(self, tenant_id: str, agent_id: str) -> tuple[int, int] | None:
        with self._lock:
            low, high = self._db.execute(
                "SELECT min(seq), max(seq) FROM events WHERE tenant_id = ? AND agent_id = ?",
                (tenant_id, agent_id)).fetchone()
        return None if low is None else (low, high)

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The most recent dead letters, newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT subject, dlq_subject, reason, code, stream_seq, tenant_id, agent_id, payload_size"
                " FROM dead_letters ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [DeadLetter(*r) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _stored(tenant_id: str, agent_id: str, etype: str, seq: int, payload: bytes) -> StoredEvent:
        # Stored payloads passed this same check on the way in; re-parsing gives back the exact Event.
        event = parse_event(subject_for(tenant_id, agent_id, etype), bytes(payload))
        if isinstance(event, Event):
            return StoredEvent(event, seq)
        raise RuntimeError(f"stored event at seq {seq} no longer parses: {event.reason}")


def _fetch_all(cursor: sqlite3.Cursor, lock: threading.Lock, size: int = 2000) -> Iterator[tuple]:
    while True:
        with lock:
            rows = cursor.fetchmany(size)
        if not rows:
            return
        yield from rows
