"""The journal: all of the node's state in one SQLite database (WAL mode, synchronous=FULL).

Instances, jobs (one per series generation) and per-destination deliveries live here, with an
audit trail of every state change. Each thread gets its own connection; the C-STORE handler's
insert is committed before the handler returns success.

The journal is a row store with a state machine: it records and reads rows and refuses a
transition the machine does not allow. When a series is complete, what is selected, when a
delivery is retried and which files retention removes are decided by the stage modules. The
schema is the SQL files in `dicomnode/sql/`, applied in order at start.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import importlib.resources
import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from dicomnode.config import LatePolicy


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
    S.PROCESSING: {S.ENCODED, S.FAILED, S.SELECTED, S.IGNORED},  # selected: recovered or retried; ignored: the
    # safety gate refused the series
    S.ENCODED: {S.SENDING, S.DONE},
    S.SENDING: {S.DONE, S.DEAD_LETTER},
    S.DONE: set(),
    S.IGNORED: set(),
    S.FAILED: {S.SELECTED},
    S.DEAD_LETTER: {S.SENDING},
}
STATES = tuple(s.value for s in JobState)
ACTIVE_STATES = (S.RECEIVED, S.COMPLETE, S.SELECTED, S.PROCESSING, S.ENCODED, S.SENDING)  # not yet settled


class DeliveryState(enum.StrEnum):
    """A delivery's state: due at `next_attempt_at`, acknowledged, or given up (`queue retry`)."""

    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD_LETTER = "dead_letter"


class Event(enum.StrEnum):
    """Audit events other than a job entering a state (those are named by the JobState)."""

    LATE_INSTANCE_IGNORED = "late_instance_ignored"
    DELIVERED = "delivered"
    DELIVERY_FAILED = "delivery_failed"
    DELIVERY_DEAD_LETTER = "delivery_dead_letter"
    PURGED = "purged"
    RETENTION_REMOVED_FILES = "retention_removed_files"


def _migrations() -> tuple[str, ...]:
    """The SQL files, in order: the n-th takes a journal from schema n - 1 to n. PRAGMA
    user_version holds the schema number. Append only; never edit a released file."""
    folder = importlib.resources.files("dicomnode") / "sql"
    return tuple(sorted(f.name for f in folder.iterdir() if f.name.endswith(".sql")))


def _statements(script: str) -> list[str]:
    """A script's statements, one by one (executescript would commit the open transaction)."""
    out, pending = [], ""
    for line in script.splitlines(keepends=True):
        if not pending and (not line.strip() or line.lstrip().startswith("--")):
            continue
        pending += line
        if sqlite3.complete_statement(pending):
            out.append(pending.strip())
            pending = ""
    if pending.strip():
        raise JournalError(f"an SQL statement does not end: {pending.strip()[:80]!r}")
    return out


MIGRATIONS = _migrations()
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
    state: JobState
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
    """One job's results on their way to one destination."""

    job_id: int
    destination: str
    state: DeliveryState
    attempts: int
    first_attempt_at: float | None
    next_attempt_at: float
    delivered_at: float | None
    last_error: str | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Delivery:
        return cls(**{**dict(row), "state": DeliveryState(row["state"])})


@dataclass
class _Queued:
    """An instance waiting to be recorded by `Journal.record_instance`'s group commit."""

    inst: Instance
    late_policy: LatePolicy
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
        folder = importlib.resources.files("dicomnode") / "sql"
        for version in range(found, SCHEMA_VERSION):
            with self._tx() as db:
                for statement in _statements((folder / MIGRATIONS[version]).read_text(encoding="utf-8")):
                    db.execute(statement)
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

    def _event(self, db: sqlite3.Connection, job_id: int | None, kind: JobState | Event, detail: str | None = None) -> None:
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
    def record_instance(self, inst: Instance, late_policy: LatePolicy = LatePolicy.REPROCESS) -> tuple[int | None, bool]:
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
        if item.result is None:
            raise RuntimeError("the instance was not recorded")
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

    def _record_one(self, db: sqlite3.Connection, inst: Instance, late_policy: LatePolicy) -> tuple[int | None, bool]:
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
        if row is not None and row["state"] == JobState.RECEIVED:
            db.execute("UPDATE jobs SET last_instance_at=?, updated_at=? WHERE id=?", (now, now, row["id"]))
            return row["id"], not existed
        if row is not None and late_policy == LatePolicy.IGNORE:
            self._event(db, row["id"], Event.LATE_INSTANCE_IGNORED, inst.sop_instance_uid)
            return None, not existed
        generation = 1 if row is None else row["generation"] + 1
        cur = db.execute(
            "INSERT INTO jobs(series_uid, study_uid, generation, state, created_at, updated_at, last_instance_at)"
            " VALUES (?,?,?,?,?,?,?)",
            (inst.series_uid, inst.study_uid, generation, JobState.RECEIVED, now, now, now),
        )
        job_id = cur.lastrowid
        self._event(db, job_id, JobState.RECEIVED, "reopened" if row is not None else None)
        return job_id, not existed

    def instances(self, series_uid: str) -> list[Instance]:
        rows = self.db.execute("SELECT * FROM instances WHERE series_uid=? ORDER BY received_at", (series_uid,))
        return [Instance(**dict(r)) for r in rows]

    def instance(self, sop_instance_uid: str) -> Instance | None:
        row = self.db.execute("SELECT * FROM instances WHERE sop_instance_uid=?", (sop_instance_uid,)).fetchone()
        return Instance(**dict(row)) if row else None

    def instance_count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM instances").fetchone()[0]

    def series_extent(self, series_uid: str) -> list[tuple[int | None, int | None, str | None]]:
        """(Images in Acquisition, Number of Frames, Image Position (Patient)) of each instance of
        the series received so far: what it says about its own size."""
        rows = self.db.execute("SELECT images_in_acquisition, number_of_frames, position FROM instances"
                               " WHERE series_uid=?", (series_uid,))
        return [(r[0], r[1], r[2]) for r in rows]

    # -- jobs -------------------------------------------------------------------------------
    def job(self, job_id: int) -> Job | None:
        row = self.db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return Job.from_row(row) if row else None

    def _job(self, job_id: int) -> Job:
        """A job that must exist (it was just written)."""
        job = self.job(job_id)
        if job is None:
            raise TransitionError(f"job {job_id} does not exist")
        return job

    def jobs(self, states: Sequence[JobState] | None = None, limit: int | None = None) -> list[Job]:
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

    def transition(self, job_id: int, to: JobState, *, expect: JobState | tuple[JobState, ...] | None = None,
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
            if (allowed and current not in allowed) or to not in TRANSITIONS[JobState(current)]:
                raise TransitionError(f"job {job_id}: cannot go from {current} to {to}")
            if "timings" in fields and isinstance(fields["timings"], dict):
                fields["timings"] = json.dumps(fields["timings"])
            now = time.time()
            cols = ", ".join(f"{k}=?" for k in fields)
            db.execute(f"UPDATE jobs SET state=?, updated_at=?{', ' + cols if cols else ''} WHERE id=?",
                       (to, now, *fields.values(), job_id))
            detail = note or fields.get("reason") or fields.get("error")
            self._event(db, job_id, to, str(detail) if detail else None)
        return self._job(job_id)

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
    def start_deliveries(self, job_id: int, destinations: list[str]) -> JobState:
        """encoded -> sending with one pending delivery per destination (done when there are
        none), in one transaction, so a crash cannot leave a job half handed to dispatch."""
        now = time.time()
        to = JobState.SENDING if destinations else JobState.DONE
        with self._tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None or row["state"] != JobState.ENCODED:
                raise TransitionError(f"job {job_id}: cannot start deliveries from {row and row['state']}")
            for name in destinations:
                db.execute("INSERT OR REPLACE INTO deliveries(job_id, destination, state, attempts, next_attempt_at)"
                           " VALUES (?, ?, ?, 0, ?)", (job_id, name, DeliveryState.PENDING, now))
            db.execute("UPDATE jobs SET state=?, updated_at=? WHERE id=?", (to, now, job_id))
            self._event(db, job_id, to)
        return to

    def deliveries(self, job_id: int | None = None, states: Sequence[DeliveryState] | None = None) -> list[Delivery]:
        sql, args = "SELECT * FROM deliveries WHERE 1=1", list[Any]()
        if job_id is not None:
            sql += " AND job_id=?"
            args.append(job_id)
        if states:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            args += list(states)
        return [Delivery.from_row(r) for r in self.db.execute(sql + " ORDER BY job_id, destination", args)]

    def due_deliveries(self, now: float) -> list[Delivery]:
        rows = self.db.execute("SELECT * FROM deliveries WHERE state=? AND next_attempt_at<=? "
                               "ORDER BY next_attempt_at", (DeliveryState.PENDING, now))
        return [Delivery.from_row(r) for r in rows]

    def record_attempt(self, job_id: int, destination: str, *, ok: bool, error: str | None = None,
                       next_attempt_at: float | None = None, dead: bool = False) -> JobState | None:
        """Record one delivery attempt; settle the job when every delivery has an outcome.

        Returns the job's state afterwards (None: the job has been purged meanwhile).
        """
        now = time.time()
        pending = DeliveryState.PENDING
        with self._tx() as db:
            if ok:
                cur = db.execute("UPDATE deliveries SET state=?, attempts=attempts+1, delivered_at=?,"
                                 " first_attempt_at=COALESCE(first_attempt_at, ?), last_error=NULL"
                                 " WHERE job_id=? AND destination=? AND state=?",
                                 (DeliveryState.DELIVERED, now, now, job_id, destination, pending))
            else:
                cur = db.execute("UPDATE deliveries SET state=?, attempts=attempts+1, last_error=?,"
                                 " first_attempt_at=COALESCE(first_attempt_at, ?), next_attempt_at=?"
                                 " WHERE job_id=? AND destination=? AND state=?",
                                 (DeliveryState.DEAD_LETTER if dead else pending, error, now, next_attempt_at or now,
                                  job_id, destination, pending))
            if cur.rowcount == 0:  # settled meanwhile (purged, dead-lettered, re-queued by an operator)
                row = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
                return JobState(row["state"]) if row else None
            kind = Event.DELIVERED if ok else (Event.DELIVERY_DEAD_LETTER if dead else Event.DELIVERY_FAILED)
            self._event(db, job_id, kind, f"{destination}: {error}" if error else f"{destination}: stored")
            states = {DeliveryState(r[0]) for r in db.execute("SELECT state FROM deliveries WHERE job_id=?", (job_id,))}
        if pending in states:
            return JobState.SENDING
        settled = JobState.DEAD_LETTER if DeliveryState.DEAD_LETTER in states else JobState.DONE
        return self.transition(job_id, settled, expect=JobState.SENDING).state

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
                           " WHERE job_id=? AND destination=? AND state=?",
                           [(until, why, now, job_id, destination, DeliveryState.PENDING)
                            for job_id, destination, until, why in deferrals])

    def delivered_instances(self, job_id: int, destination: str) -> set[str]:
        """SOP Instance UIDs of the job's results that the destination has acknowledged."""
        rows = self.db.execute("SELECT sop_instance_uid FROM delivered_instances WHERE job_id=? AND destination=?",
                               (job_id, destination))
        return {r[0] for r in rows}

    def resend(self, job_id: int, destinations: list[str] | None = None) -> JobState:
        """An operator asks for results to be sent again, all of them, also those a destination
        has acknowledged: the job's deliveries (or those to `destinations`) start afresh."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                raise TransitionError(f"job {job_id} does not exist")
            if row["state"] not in (JobState.DONE, JobState.DEAD_LETTER, JobState.SENDING):
                raise TransitionError(f"job {job_id} is {row['state']}; only done, sending or dead_letter jobs "
                                      "have results to send again")
            names = [r[0] for r in db.execute("SELECT destination FROM deliveries WHERE job_id=?", (job_id,))]
            names = [n for n in names if destinations is None or n in destinations]
            if not names:
                raise TransitionError(f"job {job_id} has no delivery to {', '.join(destinations or []) or 'any destination'}")
            for name in names:
                db.execute("DELETE FROM delivered_instances WHERE job_id=? AND destination=?", (job_id, name))
                db.execute("UPDATE deliveries SET state=?, attempts=0, first_attempt_at=NULL, delivered_at=NULL,"
                           " next_attempt_at=? WHERE job_id=? AND destination=?", (DeliveryState.PENDING, now, job_id, name))
            db.execute("UPDATE jobs SET state=?, updated_at=? WHERE id=?", (JobState.SENDING, now, job_id))
            self._event(db, job_id, JobState.SENDING, f"resend of every instance requested: {', '.join(names)}")
        return JobState.SENDING

    def retry(self, job_id: int) -> JobState:
        """Re-drive a job: dead-letter deliveries are re-queued; a failed job is processed again."""
        job = self.job(job_id)
        if job is None:
            raise TransitionError(f"job {job_id} does not exist")
        if job.state == JobState.DEAD_LETTER:
            now = time.time()
            with self._tx() as db:  # one transaction: dispatch never sees pending deliveries of a dead job
                db.execute("UPDATE deliveries SET state=?, attempts=0, first_attempt_at=NULL, next_attempt_at=?"
                           " WHERE job_id=? AND state=?", (DeliveryState.PENDING, now, job_id, DeliveryState.DEAD_LETTER))
                db.execute("UPDATE jobs SET state=?, updated_at=? WHERE id=? AND state=?",
                           (JobState.SENDING, now, job_id, JobState.DEAD_LETTER))
                self._event(db, job_id, JobState.SENDING, "retry requested")
            return JobState.SENDING
        if job.state == JobState.FAILED:
            return self.transition(job_id, JobState.SELECTED, reason="retry requested", error=None).state
        raise TransitionError(f"job {job_id} is {job.state}; only failed or dead_letter jobs can be retried")

    # -- retention --------------------------------------------------------------------------
    def purge_job(self, job_id: int) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM deliveries WHERE job_id=?", (job_id,))
            db.execute("DELETE FROM jobs WHERE id=?", (job_id,))
            self._event(db, job_id, Event.PURGED)

    def mark_purged(self, job_id: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET purged_at=? WHERE id=?", (time.time(), job_id))
            self._event(db, job_id, Event.RETENTION_REMOVED_FILES)

    def forget_series_instances(self, series_uid: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM instances WHERE series_uid=?", (series_uid,))

    def series_has_active_job(self, series_uid: str) -> bool:
        q = f"SELECT 1 FROM jobs WHERE series_uid=? AND state IN ({','.join('?' * len(ACTIVE_STATES))}) LIMIT 1"
        return self.db.execute(q, (series_uid, *ACTIVE_STATES)).fetchone() is not None

    def unpurged_jobs(self, states: Sequence[JobState], updated_before: float) -> list[Job]:
        """Jobs in `states` last changed before `updated_before` whose files are still there."""
        rows = self.db.execute(f"SELECT * FROM jobs WHERE state IN ({','.join('?' * len(states))}) AND purged_at IS NULL"
                               " AND updated_at < ? ORDER BY id", (*states, updated_before)).fetchall()
        return [Job.from_row(r) for r in rows]


def iso_time(at: float) -> str:
    """ISO 8601 local time with milliseconds and the UTC offset, e.g. 2026-12-06T04:10:00.123+01:00."""
    return datetime.datetime.fromtimestamp(at).astimezone().isoformat(timespec="milliseconds")


def parse_since(text: str, now: float) -> float:
    """The start of an audit query: an ISO 8601 date or date/time (local time unless it has an
    offset), or hours before `now` such as "24h" or "1.5h"."""
    if text.endswith("h") and text[:-1].replace(".", "", 1).isdigit():
        return now - float(text[:-1]) * 3600
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ValueError(f"{text!r} is neither an ISO date/time nor hours like 24h") from None
