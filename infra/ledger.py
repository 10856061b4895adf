"""The exactly-once record: every job the watcher has seen, and how far it got.

Why SQLite in WAL mode: it survives restarts, several watcher processes on one host can share
it safely, and a claim is one conditional UPDATE. A claim carries a lease, so a watcher that
dies between claiming a job and recording its flow run leaves a job that another watcher (or
its own restart) picks up later; the Prefect idempotency key (the job id) then returns the run
that may already exist instead of creating a second one.

States: detected -> submitting (claimed, leased) -> submitted (flow run id) -> done | failed.
It also keeps the ids of outcome events already counted in metrics (``counted_events``), so
watchers sharing the ledger count each video and failure once (infra/metrics.py).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from infra.jobs import JobTicket

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id      TEXT PRIMARY KEY,
    stem        TEXT NOT NULL,
    ticket      TEXT NOT NULL,
    state       TEXT NOT NULL,
    flow_run_id TEXT,
    claimed_by  TEXT,
    lease_until REAL NOT NULL DEFAULT 0,
    attempts    INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS object_hashes (
    location TEXT NOT NULL,
    key      TEXT NOT NULL,
    size     INTEGER NOT NULL,
    version  TEXT NOT NULL,
    sha256   TEXT NOT NULL,
    PRIMARY KEY (location, key)
);
CREATE INDEX IF NOT EXISTS jobs_flow_run ON jobs(flow_run_id);
CREATE TABLE IF NOT EXISTS counted_events (
    event_id   TEXT PRIMARY KEY,
    counted_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class JobRecord:
    ticket: JobTicket
    state: str
    flow_run_id: str | None
    attempts: int
    last_error: str | None


class Ledger:
    """A SQLite ledger of jobs. Thread-safe within a process (one lock around the
    connection); processes coordinate through SQLite's own locking."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._lock = threading.RLock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _query(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def record_detected(self, ticket: JobTicket) -> bool:
        """Insert a newly seen job. False when the job (same content) is already known."""
        now = time.time()
        with self._write() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO jobs (job_id, stem, ticket, state, created_at, updated_at)"
                " VALUES (?, ?, ?, 'detected', ?, ?)",
                (ticket.job_id, ticket.stem, ticket.model_dump_json(), now, now),
            )
            return cursor.rowcount == 1

    def claim(self, job_id: str, owner: str, lease_seconds: float) -> bool:
        """Take the right to submit this job, if nobody holds a live lease on it."""
        now = time.time()
        with self._write() as db:
            cursor = db.execute(
                "UPDATE jobs SET state='submitting', claimed_by=?, lease_until=?,"
                " attempts=attempts+1, updated_at=? WHERE job_id=? AND (state='detected'"
                " OR (state='submitting' AND lease_until < ?))",
                (owner, now + lease_seconds, now, job_id, now),
            )
            return cursor.rowcount == 1

    def claimable(self, limit: int = 500) -> list[str]:
        """Jobs waiting for a run: new ones and those whose submitter's lease ran out."""
        rows = self._query(
            "SELECT job_id FROM jobs WHERE state='detected' OR (state='submitting'"
            " AND lease_until < ?) ORDER BY created_at LIMIT ?",
            (time.time(), limit),
        )
        return [str(row[0]) for row in rows]

    def release(self, job_id: str, owner: str, error: str) -> None:
        """Give a claim back after a failed submit, so it is tried again later."""
        with self._write() as db:
            db.execute(
                "UPDATE jobs SET state='detected', claimed_by=NULL, lease_until=0,"
                " last_error=?, updated_at=? WHERE job_id=? AND claimed_by=?",
                (error[:2000], time.time(), job_id, owner),
            )

    def resubmit(self, job_id: str) -> None:
        """Send a job back to be submitted again (its flow run vanished from the server)."""
        with self._write() as db:
            db.execute("UPDATE jobs SET state='detected', flow_run_id=NULL, lease_until=0, updated_at=?"
                       " WHERE job_id=?", (time.time(), job_id))

    def retry(self, job_id: str) -> None:
        """A failed job whose run was put back in the queue: submitted again, with fresh attempts
        (this one counted), so the reconciler follows it as it follows a new submission."""
        with self._write() as db:
            db.execute("UPDATE jobs SET state='submitted', attempts=1, last_error=NULL, lease_until=0, updated_at=?"
                       " WHERE job_id=? AND state='failed'", (time.time(), job_id))

    def count_attempt(self, job_id: str) -> None:
        with self._write() as db:
            db.execute("UPDATE jobs SET attempts=attempts+1, updated_at=? WHERE job_id=?", (time.time(), job_id))

    def mark_submitted(self, job_id: str, flow_run_id: str) -> None:
        self._set_state(job_id, "submitted", flow_run_id=flow_run_id)

    def mark_finished(self, job_id: str, ok: bool, error: str | None = None) -> None:
        self._set_state(job_id, "done" if ok else "failed", error=error)

    def _set_state(self, job_id: str, state: str, flow_run_id: str | None = None,
                   error: str | None = None) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE jobs SET state=?, flow_run_id=COALESCE(?, flow_run_id),"
                " last_error=COALESCE(?, last_error), lease_until=0, updated_at=?"
                " WHERE job_id=?",
                (state, flow_run_id, error, time.time(), job_id),
            )

    def get(self, job_id: str) -> JobRecord | None:
        rows = self._query(
            "SELECT ticket, state, flow_run_id, attempts, last_error FROM jobs WHERE job_id=?",
            (job_id,),
        )
        if not rows:
            return None
        ticket, state, flow_run_id, attempts, last_error = rows[0]
        return JobRecord(JobTicket.model_validate_json(str(ticket)), str(state),
                         flow_run_id, int(attempts), last_error)  # type: ignore[arg-type]

    def in_state(self, *states: str) -> list[JobRecord]:
        marks = ",".join("?" * len(states))
        rows = self._query(f"SELECT job_id FROM jobs WHERE state IN ({marks})", states)
        return [record for (job_id,) in rows if (record := self.get(str(job_id)))]

    def states_of(self, stem: str) -> list[str]:
        """The states of the jobs made from inputs named ``stem``, newest first."""
        rows = self._query("SELECT state FROM jobs WHERE stem=? ORDER BY created_at DESC", (stem,))
        return [str(state) for (state,) in rows]

    def counts(self) -> dict[str, int]:
        rows = self._query("SELECT state, COUNT(*) FROM jobs GROUP BY state")
        return {str(state): int(count) for state, count in rows}  # type: ignore[call-overload]

    def detected_at(self, job_id: str) -> float | None:
        """Unix time the job was first recorded (the start of its end-to-end latency)."""
        rows = self._query("SELECT created_at FROM jobs WHERE job_id=?", (job_id,))
        return float(rows[0][0]) if rows else None  # type: ignore[arg-type]

    def job_of_run(self, flow_run_id: str) -> JobTicket | None:
        """The job a flow run was created for (a crash event names only the run)."""
        rows = self._query("SELECT ticket FROM jobs WHERE flow_run_id=?", (flow_run_id,))
        return JobTicket.model_validate_json(str(rows[0][0])) if rows else None

    def claim_event(self, event_id: str) -> bool:
        """True for the first caller only: the watchers sharing this ledger count each outcome once."""
        with self._write() as db:
            return db.execute("INSERT OR IGNORE INTO counted_events VALUES (?, ?)",
                              (event_id, time.time())).rowcount == 1

    def forget_events(self, older_than: float) -> None:
        """Drop claims no poller can meet again (they only read back a few minutes)."""
        with self._write() as db:
            db.execute("DELETE FROM counted_events WHERE counted_at < ?", (older_than,))

    def cached_hash(self, location: str, key: str, size: int, version: str) -> str | None:
        """The sha256 of an object version hashed before (saves re-reading on rescans)."""
        rows = self._query(
            "SELECT sha256 FROM object_hashes WHERE location=? AND key=? AND size=? AND version=?",
            (location, key, size, version),
        )
        return str(rows[0][0]) if rows else None

    def remember_hash(self, location: str, key: str, size: int, version: str, sha256: str) -> None:
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO object_hashes VALUES (?, ?, ?, ?, ?)",
                       (location, key, size, version, sha256))
