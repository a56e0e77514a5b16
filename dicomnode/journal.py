"""The journal: all of the node's state in one SQLite database (WAL mode, synchronous=FULL).

Instances, jobs (one per series generation) and per-destination deliveries live here, with an
audit trail of every state change. Each thread gets its own connection; the C-STORE handler's
insert is committed before the handler returns success.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator


class JobState(enum.StrEnum):
    """A job's state; compares equal to its string value (as stored in SQLite)."""

    RECEIVED = "received"
    COMPLETE = "complete"
    SELECTED = "selected"
    IGNORED = "ignored"
    PROCESSING = "processing"
    ENCODED = "encoded"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"
    DEAD_LETTER = "dead_letter"


S = JobState
# The job state machine. Terminal states: done, ignored, failed, dead_letter (failed and
# dead_letter can be re-driven by `dicomnode queue retry`).
TRANSITIONS: dict[JobState, set[JobState]] = {
    S.RECEIVED: {S.COMPLETE},
    S.COMPLETE: {S.SELECTED, S.IGNORED, S.FAILED},
    S.SELECTED: {S.PROCESSING, S.FAILED},
    S.PROCESSING: {S.ENCODED, S.FAILED, S.SELECTED},  # selected: recovered after a crash, or retried
    S.ENCODED: {S.SENDING, S.DONE},
    S.SENDING: {S.DONE, S.DEAD_LETTER},
    S.DONE: set(),
    S.IGNORED: set(),
    S.FAILED: {S.SELECTED},
    S.DEAD_LETTER: {S.SENDING},
}
STATES = tuple(s.value for s in JobState)
ACTIVE_STATES = ("received", "complete", "selected", "processing", "encoded", "sending")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    calling_aet TEXT,
    received_at REAL NOT NULL,
    images_in_acquisition INTEGER,
    number_of_frames INTEGER,
    position TEXT
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 1,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    last_instance_at REAL NOT NULL,
    completed_at REAL,
    completion TEXT,
    rule TEXT,
    reason TEXT,
    error TEXT,
    output_dir TEXT,
    outputs INTEGER,
    timings TEXT,
    purged_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_series ON jobs(series_uid);
CREATE TABLE IF NOT EXISTS deliveries (
    job_id INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    destination TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    first_attempt_at REAL,
    next_attempt_at REAL NOT NULL,
    delivered_at REAL,
    last_error TEXT,
    PRIMARY KEY (job_id, destination)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    job_id INTEGER,
    kind TEXT NOT NULL,
    detail TEXT
);
"""


def _baseline(db: sqlite3.Connection) -> None:
    """Schema 1: the tables as first released (a no-op on a journal that already has them)."""
    for statement in filter(str.strip, _SCHEMA.split(";")):
        db.execute(statement)
    db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', '1')")


def _job_attempts(db: sqlite3.Connection) -> None:
    """Schema 2: how often a job's inference process crashed (for [inference] crash_retries)."""
    db.execute("ALTER TABLE jobs ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0")


def _delivered_instances(db: sqlite3.Connection) -> None:
    """Schema 3: which result instances each destination has acknowledged, so a retry sends only
    the others. Rows go with their delivery (a purge, or new results for the job)."""
    db.execute("""
        CREATE TABLE delivered_instances (
            job_id INTEGER NOT NULL,
            destination TEXT NOT NULL,
            sop_instance_uid TEXT NOT NULL,
            at REAL NOT NULL,
            PRIMARY KEY (job_id, destination, sop_instance_uid),
            FOREIGN KEY (job_id, destination) REFERENCES deliveries(job_id, destination) ON DELETE CASCADE
        )""")


# Ordered migrations: MIGRATIONS[i] takes a journal from schema i to i + 1. PRAGMA user_version
# holds the schema number. Append only; never edit a released migration.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_baseline, _job_attempts, _delivered_instances)
SCHEMA_VERSION = len(MIGRATIONS)


class JournalError(RuntimeError):
    """The journal cannot be used by this version of dicomnode."""


class TransitionError(RuntimeError):
    pass


@dataclass(frozen=True)
class Job:
    id: int
    series_uid: str
    study_uid: str
    generation: int
    state: str
    created_at: float
    updated_at: float
    last_instance_at: float
    completed_at: float | None
    completion: str | None
    rule: str | None
    reason: str | None
    error: str | None
    output_dir: str | None
    outputs: int | None
    timings: dict[str, float]
    purged_at: float | None
    attempts: int = 0

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Job":
        d = dict(row)
        d["timings"] = json.loads(d["timings"]) if d["timings"] else {}
        d["state"] = JobState(d["state"])
        return cls(**d)


@dataclass(frozen=True)
class Instance:
    sop_instance_uid: str
    series_uid: str
    study_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: str
    size: int
    calling_aet: str | None
    received_at: float
    images_in_acquisition: int | None
    number_of_frames: int | None
    position: str | None


@dataclass(frozen=True)
class Delivery:
    """One job's results on their way to one destination. `state`: pending (due at
    `next_attempt_at`), delivered, or dead_letter (given up; `queue retry` re-queues it)."""

    job_id: int
    destination: str
    state: str
    attempts: int
    first_attempt_at: float | None
    next_attempt_at: float
    delivered_at: float | None
    last_error: str | None


@dataclass
class _Queued:
    """An instance waiting to be recorded by `Journal.record_instance`'s group commit."""

    inst: Instance
    late_policy: str
    result: tuple[int | None, bool] | None = None
    error: Exception | None = None
    done: bool = False


class Journal:
    def __init__(self, path: Path, audit_file: Path | None = None):
        self.path = Path(path)
        self.audit_file = audit_file  # also append each event as a JSON line here (the journal keeps them anyway)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._series_locks: dict[str, list] = {}  # series UID -> [lock, holders]; pruned when unheld
        self._series_locks_guard = threading.Lock()
        self._queue: list[_Queued] = []  # instances waiting for the next group commit
        self._queue_lock = threading.Lock()
        self.migrate()

    def migrate(self) -> int:
        """Bring the journal to SCHEMA_VERSION (each migration in its own transaction); refuse a
        journal written by a newer dicomnode. Returns the schema version found."""
        with self._tx() as db:
            found = db.execute("PRAGMA user_version").fetchone()[0]
            if found > SCHEMA_VERSION:
                raise JournalError(f"{self.path} has journal schema {found}, newer than this dicomnode's "
                                   f"({SCHEMA_VERSION}); upgrade dicomnode, or use another storage_dir")
        for version in range(found, SCHEMA_VERSION):
            with self._tx() as db:
                MIGRATIONS[version](db)
                db.execute(f"PRAGMA user_version = {version + 1}")
                db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)", (str(version + 1),))
        return found

    # -- plumbing ---------------------------------------------------------------------------
    @property
    def db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    class _Tx:
        def __init__(self, journal: "Journal"):
            self.journal = journal

        def __enter__(self) -> sqlite3.Connection:
            self.journal._write_lock.acquire()
            try:
                db = self.journal.db
                db.execute("BEGIN IMMEDIATE")
            except BaseException:
                self.journal._write_lock.release()  # never leave the node locked out of its journal
                raise
            return db

        def __exit__(self, exc_type, exc, tb):
            journal = self.journal
            db = journal.db
            committed = False
            try:
                if exc_type:
                    db.execute("ROLLBACK")
                else:
                    try:
                        db.execute("COMMIT")
                        committed = True
                    except BaseException:
                        with contextlib.suppress(sqlite3.Error):
                            db.execute("ROLLBACK")  # leave this thread's connection usable
                        raise
            finally:
                journal._write_lock.release()
                journal._end_audit(committed)
            return False

    def _tx(self) -> "Journal._Tx":
        """A write transaction (BEGIN IMMEDIATE ... COMMIT), serialised within the process."""
        return Journal._Tx(self)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @contextlib.contextmanager
    def series_lock(self, series_uid: str) -> Iterator[None]:
        """Serialises storing an instance of a series with removing that series' files. A lock
        lives only while someone holds or waits for it, so the table stays as small as the
        number of series being worked on at once."""
        with self._series_locks_guard:
            entry = self._series_locks.setdefault(series_uid, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._series_locks_guard:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._series_locks[series_uid]

    def _event(self, db: sqlite3.Connection, job_id: int | None, kind: str, detail: str | None = None) -> None:
        """Record an event in the open transaction. Its line for the audit file waits in this
        thread's list until the transaction ends: written if it committed, dropped if not, so the
        file never tells of a change that did not happen."""
        at = time.time()
        db.execute("INSERT INTO events(at, job_id, kind, detail) VALUES (?, ?, ?, ?)", (at, job_id, kind, detail))
        if self.audit_file is not None:
            row = db.execute("SELECT series_uid, generation FROM jobs WHERE id=?", (job_id,)).fetchone()
            self._audit_pending().append({
                "time": iso_time(at), "job_id": job_id, "series_uid": row["series_uid"] if row else None,
                "generation": row["generation"] if row else None, "event": kind, "detail": detail})

    def _audit_pending(self) -> list[dict]:
        pending = getattr(self._local, "audit", None)
        if pending is None:
            pending = self._local.audit = []
        return pending

    def _end_audit(self, committed: bool, keep: int = 0) -> None:
        """The transaction ended: append its events to the audit file if it committed; drop
        them if not. `keep` > 0 drops only the events after the first `keep` (a savepoint)."""
        pending = self._audit_pending()
        if not committed:
            del pending[keep:]
            return
        lines, pending[:] = list(pending), []
        if not lines or self.audit_file is None:
            return
        try:
            with open(self.audit_file, "a", encoding="utf-8") as fh:
                fh.write("".join(json.dumps(line) + "\n" for line in lines))
        except OSError as exc:  # the journal keeps the events; the file is a convenience copy
            logging.getLogger("dicomnode.journal").error("cannot append to the audit file: %s", exc)

    # -- instances --------------------------------------------------------------------------
    def record_instance(self, inst: Instance, late_policy: str = "reprocess") -> tuple[int | None, bool]:
        """Record a stored instance and attach it to its series' open job; committed (fsynced)
        before it returns.

        Returns (job_id, is_new_instance). A re-sent SOP Instance UID replaces the old row. An
        instance for a series whose job already completed re-opens the series as a new job
        generation (policy 'reprocess') or is kept without a new job (policy 'ignore').

        Group commit: concurrent callers (one per receiving association) queue their instance;
        whichever thread gets the write lock records everything queued in one transaction, so
        four senders share one WAL fsync instead of waiting in line for four. Each instance has
        its own savepoint: one that fails does not undo the others.
        """
        item = _Queued(inst, late_policy)
        with self._queue_lock:
            self._queue.append(item)
        with self._write_lock:
            if not item.done:
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                self._record_batch(batch)
        if item.error is not None:
            raise item.error
        return item.result

    def _record_batch(self, batch: list["_Queued"]) -> None:
        db = self.db
        committed = False
        try:
            db.execute("BEGIN IMMEDIATE")
            for item in batch:
                db.execute("SAVEPOINT instance")
                events_before = len(self._audit_pending())
                try:
                    item.result = self._record_one(db, item.inst, item.late_policy)
                    db.execute("RELEASE instance")
                except Exception as exc:
                    db.execute("ROLLBACK TO instance")
                    db.execute("RELEASE instance")
                    self._end_audit(False, keep=events_before)
                    item.error = exc
            db.execute("COMMIT")
            committed = True
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")  # leave this thread's connection usable
            for item in batch:
                item.result, item.error = None, item.error or (exc if isinstance(exc, Exception) else RuntimeError(exc))
            if not isinstance(exc, Exception):
                raise
        finally:
            self._end_audit(committed)
            for item in batch:
                item.done = True

    def _record_one(self, db: sqlite3.Connection, inst: Instance, late_policy: str) -> tuple[int | None, bool]:
        now = inst.received_at
        existed = db.execute("SELECT 1 FROM instances WHERE sop_instance_uid=?", (inst.sop_instance_uid,)).fetchone()
        db.execute(
            "INSERT OR REPLACE INTO instances VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (inst.sop_instance_uid, inst.series_uid, inst.study_uid, inst.sop_class_uid, inst.transfer_syntax,
             inst.path, inst.size, inst.calling_aet, inst.received_at, inst.images_in_acquisition,
             inst.number_of_frames, inst.position),
        )
        row = db.execute("SELECT id, state, generation FROM jobs WHERE series_uid=? ORDER BY id DESC LIMIT 1",
                         (inst.series_uid,)).fetchone()
        if row is not None and row["state"] == "received":
            db.execute("UPDATE jobs SET last_instance_at=?, updated_at=? WHERE id=?", (now, now, row["id"]))
            return row["id"], not existed
        if row is not None and late_policy == "ignore":
            self._event(db, row["id"], "late_instance_ignored", inst.sop_instance_uid)
            return None, not existed
        generation = 1 if row is None else row["generation"] + 1
        cur = db.execute(
            "INSERT INTO jobs(series_uid, study_uid, generation, state, created_at, updated_at, last_instance_at)"
            " VALUES (?,?,?,?,?,?,?)",
            (inst.series_uid, inst.study_uid, generation, "received", now, now, now),
        )
        job_id = cur.lastrowid
        self._event(db, job_id, "received", "reopened" if row is not None else None)
        return job_id, not existed

    def instances(self, series_uid: str) -> list[Instance]:
        rows = self.db.execute("SELECT * FROM instances WHERE series_uid=? ORDER BY received_at", (series_uid,))
        return [Instance(**dict(r)) for r in rows]

    def instance(self, sop_instance_uid: str) -> Instance | None:
        row = self.db.execute("SELECT * FROM instances WHERE sop_instance_uid=?", (sop_instance_uid,)).fetchone()
        return Instance(**dict(row)) if row else None

    def instance_count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM instances").fetchone()[0]

    def declared_size_met(self, series_uid: str) -> bool:
        """Whether the series says how big it is and all of it is here.

        Heuristic (documented in the README): a multi-frame instance (Number of Frames > 1)
        carries the whole series; otherwise Images in Acquisition (0020,1002), when every
        instance agrees on it, must equal the number of distinct Image Position (Patient)
        values received (or of instances where positions are missing).
        """
        rows = self.db.execute(
            "SELECT images_in_acquisition AS n, number_of_frames AS f, position AS p FROM instances WHERE series_uid=?",
            (series_uid,),
        ).fetchall()
        if not rows:
            return False
        if any((r["f"] or 1) > 1 for r in rows):
            return True
        declared = {r["n"] for r in rows}
        if len(declared) != 1 or None in declared:
            return False
        (n,) = declared
        positions = [r["p"] for r in rows]
        have = len(set(positions)) if all(positions) else len(rows)
        return n > 0 and have >= n

    # -- jobs -------------------------------------------------------------------------------
    def job(self, job_id: int) -> Job | None:
        row = self.db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return Job.from_row(row) if row else None

    def jobs(self, states: tuple[str, ...] | list[str] | None = None, limit: int | None = None) -> list[Job]:
        sql, args = "SELECT * FROM jobs", []
        if states:
            sql += f" WHERE state IN ({','.join('?' * len(states))})"
            args += list(states)
        sql += " ORDER BY id"
        if limit:
            sql += f" LIMIT {int(limit)}"
        return [Job.from_row(r) for r in self.db.execute(sql, args)]

    def last_job(self) -> Job | None:
        row = self.db.execute("SELECT * FROM jobs ORDER BY id DESC LIMIT 1").fetchone()
        return Job.from_row(row) if row else None

    def state_counts(self) -> dict[str, int]:
        counts = {s: 0 for s in STATES}
        for row in self.db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
            counts[row[0]] = row[1]
        return counts

    def transition(self, job_id: int, to: str, *, expect: str | tuple[str, ...] | None = None,
                   note: str | None = None, **fields: Any) -> Job:
        """Move a job to state `to`, checking the state machine; also set `fields` on the row.
        The audit event's detail is `note`, else the reason or error being recorded."""
        if to not in TRANSITIONS:
            raise TransitionError(f"unknown state {to!r}")
        with self._tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                raise TransitionError(f"job {job_id} does not exist")
            current = row["state"]
            allowed = (expect,) if isinstance(expect, str) else expect
            if (allowed and current not in allowed) or to not in TRANSITIONS[current]:
                raise TransitionError(f"job {job_id}: cannot go from {current} to {to}")
            if "timings" in fields and isinstance(fields["timings"], dict):
                fields["timings"] = json.dumps(fields["timings"])
            now = time.time()
            cols = ", ".join(f"{k}=?" for k in fields)
            db.execute(f"UPDATE jobs SET state=?, updated_at=?{', ' + cols if cols else ''} WHERE id=?",
                       (to, now, *fields.values(), job_id))
            detail = note or fields.get("reason") or fields.get("error")
            self._event(db, job_id, to, str(detail) if detail else None)
        return self.job(job_id)  # type: ignore[return-value]

    def update_job(self, job_id: int, **fields: Any) -> None:
        if "timings" in fields and isinstance(fields["timings"], dict):
            fields["timings"] = json.dumps(fields["timings"])
        with self._tx() as db:
            cols = ", ".join(f"{k}=?" for k in fields)
            db.execute(f"UPDATE jobs SET {cols}, updated_at=? WHERE id=?", (*fields.values(), time.time(), job_id))

    def recover(self, destinations: list[str]) -> list[int]:
        """After a restart: jobs caught mid-processing go back to 'selected' to be redone, and
        encoded jobs not yet handed to dispatch get their deliveries."""
        ids = [j.id for j in self.jobs(["processing"])]
        for job_id in ids:
            self.transition(job_id, "selected", reason="recovered after restart")
        for job in self.jobs(["encoded"]):
            self.start_deliveries(job.id, destinations)
            ids.append(job.id)
        return ids

    def events(self, job_id: int) -> list[dict[str, Any]]:
        return [dict(r) for r in self.db.execute("SELECT * FROM events WHERE job_id=? ORDER BY id", (job_id,))]

    def audit(self, series_uid: str | None = None, since: float | None = None, limit: int = 10000) -> list[dict]:
        """Every recorded event with its job's series, oldest first: the audit trail."""
        sql = ("SELECT e.at, e.job_id, e.kind, e.detail, j.series_uid, j.generation, j.outputs, j.timings "
               "FROM events e LEFT JOIN jobs j ON j.id = e.job_id WHERE 1=1")
        args: list[Any] = []
        if series_uid:
            sql += " AND j.series_uid=?"
            args.append(series_uid)
        if since is not None:
            sql += " AND e.at>=?"
            args.append(since)
        sql += f" ORDER BY e.id LIMIT {int(limit)}"
        return [dict(r) for r in self.db.execute(sql, args)]

    # -- deliveries -------------------------------------------------------------------------
    def start_deliveries(self, job_id: int, destinations: list[str]) -> str:
        """encoded -> sending with one pending delivery per destination (done when there are
        none), in one transaction, so a crash cannot leave a job half handed to dispatch."""
        now = time.time()
        to = "sending" if destinations else "done"
        with self._tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None or row["state"] != "encoded":
                raise TransitionError(f"job {job_id}: cannot start deliveries from {row and row['state']}")
            for name in destinations:
                db.execute("INSERT OR REPLACE INTO deliveries(job_id, destination, state, attempts, next_attempt_at)"
                           " VALUES (?, ?, 'pending', 0, ?)", (job_id, name, now))
            db.execute("UPDATE jobs SET state=?, updated_at=? WHERE id=?", (to, now, job_id))
            self._event(db, job_id, to)
        return to

    def deliveries(self, job_id: int | None = None, states: tuple[str, ...] | None = None) -> list[Delivery]:
        sql, args = "SELECT * FROM deliveries WHERE 1=1", []
        if job_id is not None:
            sql += " AND job_id=?"
            args.append(job_id)
        if states:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            args += list(states)
        return [Delivery(**dict(r)) for r in self.db.execute(sql + " ORDER BY job_id, destination", args)]

    def due_deliveries(self, now: float) -> list[Delivery]:
        rows = self.db.execute("SELECT * FROM deliveries WHERE state='pending' AND next_attempt_at<=? "
                               "ORDER BY next_attempt_at", (now,))
        return [Delivery(**dict(r)) for r in rows]

    def record_attempt(self, job_id: int, destination: str, *, ok: bool, error: str | None = None,
                       next_attempt_at: float | None = None, dead: bool = False) -> str:
        """Record one delivery attempt; settle the job when every delivery has an outcome.

        Returns the job's state afterwards.
        """
        now = time.time()
        with self._tx() as db:
            if ok:
                cur = db.execute("UPDATE deliveries SET state='delivered', attempts=attempts+1, delivered_at=?,"
                                 " first_attempt_at=COALESCE(first_attempt_at, ?), last_error=NULL"
                                 " WHERE job_id=? AND destination=? AND state='pending'", (now, now, job_id, destination))
            else:
                cur = db.execute("UPDATE deliveries SET state=?, attempts=attempts+1, last_error=?,"
                                 " first_attempt_at=COALESCE(first_attempt_at, ?), next_attempt_at=?"
                                 " WHERE job_id=? AND destination=? AND state='pending'",
                                 ("dead_letter" if dead else "pending", error, now, next_attempt_at or now, job_id,
                                  destination))
            if cur.rowcount == 0:  # settled meanwhile (purged, dead-lettered, re-queued by an operator)
                row = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
                return row["state"] if row else "purged"
            self._event(db, job_id, "delivered" if ok else ("delivery_dead_letter" if dead else "delivery_failed"),
                        f"{destination}: {error}" if error else f"{destination}: stored")
            states = {r[0] for r in db.execute("SELECT state FROM deliveries WHERE job_id=?", (job_id,))}
        if "pending" in states:
            return "sending"
        return self.transition(job_id, "dead_letter" if "dead_letter" in states else "done", expect="sending").state

    def record_instance_delivered(self, job_id: int, destination: str, sop_instance_uid: str) -> None:
        """The destination answered success for this result instance: committed before the next
        instance is sent, so no retry sends it again."""
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO delivered_instances(job_id, destination, sop_instance_uid, at)"
                       " VALUES (?, ?, ?, ?)", (job_id, destination, sop_instance_uid, time.time()))

    def defer_deliveries(self, deferrals: list[tuple[int, str, float, str]]) -> None:
        """Put pending deliveries, (job id, destination, until, why), off without an attempt (their
        destination is held), in one transaction; each one's give-up clock starts now if it has
        not yet."""
        now = time.time()
        with self._tx() as db:
            db.executemany("UPDATE deliveries SET next_attempt_at=?, last_error=?,"
                           " first_attempt_at=COALESCE(first_attempt_at, ?)"
                           " WHERE job_id=? AND destination=? AND state='pending'",
                           [(until, why, now, job_id, destination) for job_id, destination, until, why in deferrals])

    def delivered_instances(self, job_id: int, destination: str) -> set[str]:
        """SOP Instance UIDs of the job's results that the destination has acknowledged."""
        rows = self.db.execute("SELECT sop_instance_uid FROM delivered_instances WHERE job_id=? AND destination=?",
                               (job_id, destination))
        return {r[0] for r in rows}

    def resend(self, job_id: int, destinations: list[str] | None = None) -> str:
        """An operator asks for results to be sent again, all of them, also those a destination
        has acknowledged: the job's deliveries (or those to `destinations`) start afresh."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                raise TransitionError(f"job {job_id} does not exist")
            if row["state"] not in ("done", "dead_letter", "sending"):
                raise TransitionError(f"job {job_id} is {row['state']}; only done, sending or dead_letter jobs "
                                      "have results to send again")
            names = [r[0] for r in db.execute("SELECT destination FROM deliveries WHERE job_id=?", (job_id,))]
            names = [n for n in names if destinations is None or n in destinations]
            if not names:
                raise TransitionError(f"job {job_id} has no delivery to {', '.join(destinations or []) or 'any destination'}")
            for name in names:
                db.execute("DELETE FROM delivered_instances WHERE job_id=? AND destination=?", (job_id, name))
                db.execute("UPDATE deliveries SET state='pending', attempts=0, first_attempt_at=NULL, delivered_at=NULL,"
                           " next_attempt_at=? WHERE job_id=? AND destination=?", (now, job_id, name))
            db.execute("UPDATE jobs SET state='sending', updated_at=? WHERE id=?", (now, job_id))
            self._event(db, job_id, "sending", f"resend of every instance requested: {', '.join(names)}")
        return "sending"

    def retry(self, job_id: int) -> str:
        """Re-drive a job: dead-letter deliveries are re-queued; a failed job is processed again."""
        job = self.job(job_id)
        if job is None:
            raise TransitionError(f"job {job_id} does not exist")
        if job.state == "dead_letter":
            now = time.time()
            with self._tx() as db:  # one transaction: dispatch never sees pending deliveries of a dead job
                db.execute("UPDATE deliveries SET state='pending', attempts=0, first_attempt_at=NULL, next_attempt_at=?"
                           " WHERE job_id=? AND state='dead_letter'", (now, job_id))
                db.execute("UPDATE jobs SET state='sending', updated_at=? WHERE id=? AND state='dead_letter'",
                           (now, job_id))
                self._event(db, job_id, "sending", "retry requested")
            return "sending"
        if job.state == "failed":
            return self.transition(job_id, "selected", reason="retry requested", error=None).state
        raise TransitionError(f"job {job_id} is {job.state}; only failed or dead_letter jobs can be retried")

    # -- retention --------------------------------------------------------------------------
    def purge_job(self, job_id: int) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM deliveries WHERE job_id=?", (job_id,))
            db.execute("DELETE FROM jobs WHERE id=?", (job_id,))
            self._event(db, job_id, "purged")

    def mark_purged(self, job_id: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET purged_at=? WHERE id=?", (time.time(), job_id))
            self._event(db, job_id, "retention_removed_files")

    def forget_series_instances(self, series_uid: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM instances WHERE series_uid=?", (series_uid,))

    def series_has_active_job(self, series_uid: str) -> bool:
        q = f"SELECT 1 FROM jobs WHERE series_uid=? AND state IN ({','.join('?' * len(ACTIVE_STATES))}) LIMIT 1"
        return self.db.execute(q, (series_uid, *ACTIVE_STATES)).fetchone() is not None

    def iter_jobs_for_retention(self, older_than: float) -> Iterator[Job]:
        rows = self.db.execute("SELECT * FROM jobs WHERE state IN ('done','ignored','failed') AND purged_at IS NULL"
                               " AND updated_at < ? ORDER BY id", (older_than,)).fetchall()
        return (Job.from_row(r) for r in rows)


def iso_time(at: float) -> str:
    """ISO 8601 local time with milliseconds and the UTC offset, e.g. 2026-12-06T04:10:00.123+01:00."""
    return datetime.datetime.fromtimestamp(at).astimezone().isoformat(timespec="milliseconds")
