"""The process stage: a selected series is synthesised (inference + encoding) in the inference
process, which writes the outputs to the job's folder in the spool.

Why a separate process: a watchdog cannot stop a thread, and a segfault, an abort in a native
library or an out-of-memory kill would take the C-STORE SCP down with it. The inference process
is spawned once, builds its processor (loads the model) once and stays warm; the node sends it
job ids and file paths over a pipe, never pixel data. A job that exceeds the watchdog gets the
process killed and a fresh one started; a process that dies is replaced; either way the job ends
with the reason (or is retried, `[inference] crash_retries`) and the node keeps receiving.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import sqlite3
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Callable

from dicomnode.config import InferenceConfig
from dicomnode.journal import Job, JobState, Journal
from dicomnode.records import CompleteSeries, Processor, ProcessResult
from dicomnode.spool import Spool

log = logging.getLogger("dicomnode.process")

STOP_GRACE_SECONDS = 5.0


class InferenceFailed(RuntimeError):
    """The processor raised: the series could not be synthesised (the process is fine)."""


class InferenceCrashed(RuntimeError):
    """The inference process died (signal, abort, out of memory) or could not start."""


class InferenceTimeout(RuntimeError):
    """The job exceeded the watchdog; the inference process was killed and replaced."""


class InferenceUnavailable(RuntimeError):
    """Where inference runs cannot be reached (a Ray cluster): the job waits, no attempt is counted."""


@dataclass(frozen=True)
class ProcessRequest:
    """What crosses the pipe for one job: ids and paths only."""

    job_id: int
    study_uid: str
    series_uid: str
    paths: tuple[str, ...]
    out_dir: str


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "is unresponsive"
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {code}"


# -- the inference process (child side) -----------------------------------------------------
def _exit_with_parent() -> None:
    """Exit as soon as the node is gone, also mid-job: a node that was SIGKILLed (or killed by the
    kernel's OOM killer) cannot tell us to stop, and a busy child would compute on for nobody,
    holding the model's memory. The spawn start method gives the child a sentinel for its
    parent, readable once the parent has died. (PR_SET_PDEATHSIG would fire when the *thread*
    that started the child ends, and the node starts replacements from its worker thread.)"""
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        os._exit(0)

    threading.Thread(target=watch, name="dicomnode-parent-watch", daemon=True).start()


def _child_main(conn: Connection, processor_spec: Any) -> None:
    """Build the processor, say ready, then run requests until told to stop or the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the node; the node stops us
    _exit_with_parent()
    try:
        processor = processor_spec() if not hasattr(processor_spec, "process") else processor_spec
    except BaseException as exc:  # noqa: BLE001 - reported to the node, which decides
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    if hasattr(processor, "progress"):
        processor.progress = lambda done, total: conn.send(("progress", done, total))
    conn.send(("ready", {"name": processor.name, "device": str(getattr(processor, "device", "cpu")),
                         "pid": os.getpid()}))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        try:
            conn.send(("done", _run(processor, request)))
        except Exception as exc:  # one bad series fails its job; the process goes on
            conn.send(("failed", f"{type(exc).__name__}: {exc}"))


def run_processor(processor: Processor, req: ProcessRequest, datasets: list) -> ProcessResult:
    """One job through a processor, wherever it runs (the inference process, a Ray actor)."""
    series = CompleteSeries(req.job_id, req.study_uid, req.series_uid, tuple(Path(p) for p in req.paths))
    result = processor.process(series, datasets)
    if not result.datasets:
        raise ValueError("the processor returned no images")
    return result


def output_name(ds) -> str:
    """The file name of a derived instance in the job's output folder."""
    from dicomnode.spool import check_uid

    return f"{check_uid(ds.SOPInstanceUID, 'output SOP Instance UID')}.dcm"


def _run(processor: Processor, req: ProcessRequest) -> dict:
    from pydicom import dcmread

    from dicomnode.spool import write_dataset

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    datasets = [dcmread(p) for p in req.paths]
    timings["load"] = time.perf_counter() - t0
    result = run_processor(processor, req, datasets)
    timings.update(result.timings)
    t0 = time.perf_counter()
    out_dir = Path(req.out_dir)
    for ds in result.datasets:
        write_dataset(out_dir / output_name(ds), ds)
    timings["write"] = time.perf_counter() - t0
    return {"outputs": len(result.datasets), "timings": timings, "metrics": dict(result.metrics)}


# -- the node's side ------------------------------------------------------------------------
class InferenceProcess:
    """Owns the inference process: start (and wait until the processor is built), run one request
    with a watchdog, replace the process when it dies or hangs, stop."""

    capacity = 1  # jobs in flight at once
    hold_jobs_while_unready = False  # a job waits in `run` for a (re)starting process

    def __init__(self, processor_spec: Any, *, start_timeout: float = 600.0,
                 on_progress: Callable[[int, int], None] | None = None, on_restart: Callable[[str], None] | None = None,
                 on_wait: Callable[[], None] | None = None):
        self.processor_spec = processor_spec  # a picklable Processor, or a picklable factory of one
        self.start_timeout = start_timeout
        self.on_progress = on_progress
        self.on_restart = on_restart
        self.on_wait = on_wait  # called about once a second while waiting (the node's heartbeat)
        self.info: dict[str, Any] = {}
        self._ctx = mp.get_context("spawn")  # a fresh interpreter: no inherited threads, locks or sockets
        self._proc: mp.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._ready = False
        self._last_start = float("-inf")
        self._pipe = threading.RLock()  # one reader of the pipe at a time

    @property
    def ready(self) -> bool:
        """The processor is built (model loaded); picks up a pending 'ready' message without waiting."""
        # Called from the health endpoint's thread too: read the pipe only when no one else is.
        if not self._ready and self._pipe.acquire(blocking=False):
            try:
                if self._conn is not None and self._proc is not None and self._proc.is_alive() and self._conn.poll(0):
                    kind, payload = self._conn.recv()
                    if kind == "ready":
                        self.info, self._ready = payload, True
                    else:
                        log.error("the inference process could not start: %s", payload)
                        self._reap()
            except (EOFError, OSError):
                pass
            finally:
                self._pipe.release()
        return self._ready

    def ensure_started(self, min_interval: float = 10.0) -> None:
        """Start a replacement in the background after a crash or a watchdog kill, so the model is
        loaded again before the next job needs it (at most one start per `min_interval`)."""
        if self._proc is not None and not self._proc.is_alive():  # died while idle
            log.error("the inference process %s while idle; starting a new one", _describe_exit(self._proc.exitcode))
            if self.on_restart is not None:
                self.on_restart("crash")
            self._reap()
        if self._proc is None and time.monotonic() - self._last_start >= min_interval:
            self.start(wait_ready=False)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.is_alive() else None

    def status(self) -> tuple[bool, str]:
        """(ready, what /readyz says about the model)."""
        pid = self.pid
        if pid and self.ready:
            return True, f"{self.info.get('name', '?')} loaded in process {pid}"
        return False, "the inference process is (re)starting"

    def start(self, wait_ready: bool = True) -> None:
        self._last_start = time.monotonic()
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_child_main, args=(child, self.processor_spec), name="dicomnode-infer",
                                       daemon=True)
        self._proc.start()
        child.close()
        self._conn, self._ready = parent, False
        if wait_ready:
            self._await_ready(self.start_timeout)

    def _await_ready(self, timeout: float) -> None:
        with self._pipe:
            if self._ready:  # the health endpoint picked the message up meanwhile
                return
            kind, payload = self._receive(time.monotonic() + timeout, what="start")
        if kind == "error":
            self._reap()
            raise InferenceCrashed(f"the inference process could not start: {payload}")
        self.info, self._ready = payload, True
        log.info("inference process %s ready (%s on %s)", payload["pid"], payload["name"], payload["device"])

    def run(self, request: ProcessRequest, timeout: float) -> dict:
        """Run one job; raise InferenceFailed / InferenceCrashed / InferenceTimeout with the reason."""
        if self._proc is None or not self._proc.is_alive():
            self._reap()
            self.start(wait_ready=False)
        if not self.ready:
            self._await_ready(self.start_timeout)
        with self._pipe:
            return self._exchange(request, timeout)

    def _exchange(self, request: ProcessRequest, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        try:
            self._conn.send(request)
        except (OSError, EOFError):
            raise self._crashed("before the job started") from None
        while True:
            kind, *payload = self._receive(deadline, what="job", timeout_s=timeout)
            if kind == "progress":
                if self.on_progress is not None:
                    self.on_progress(*payload)
                continue
            if kind == "done":
                return payload[0]
            raise InferenceFailed(payload[0])

    def _receive(self, deadline: float, *, what: str, timeout_s: float | None = None) -> tuple:
        """The next message, or: the process died -> InferenceCrashed; deadline -> kill, InferenceTimeout."""
        while True:
            left = deadline - time.monotonic()
            ready = wait([self._conn, self._proc.sentinel], timeout=min(1.0, max(0.0, left)))
            if self.on_wait is not None:
                self.on_wait()
            if self._conn in ready:
                try:
                    return self._conn.recv()
                except (EOFError, OSError):
                    pass  # the pipe closed: the process is gone; fall through to the exit status
            if self._conn in ready or self._proc.sentinel in ready:
                raise self._crashed(f"during {what}")
            if time.monotonic() >= deadline:
                self._kill()
                if self.on_restart is not None:
                    self.on_restart("timeout")
                if what == "start":
                    raise InferenceCrashed(f"the inference process did not start within {self.start_timeout:g} s")
                raise InferenceTimeout(f"inference exceeded {timeout_s:g} s; the inference process was killed "
                                       "and is restarted")

    def _crashed(self, when: str) -> InferenceCrashed:
        self._proc.join(timeout=STOP_GRACE_SECONDS)
        why = _describe_exit(self._proc.exitcode)
        self._reap()
        if self.on_restart is not None:
            self.on_restart("crash")
        return InferenceCrashed(f"the inference process {why} {when}")

    def _kill(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=STOP_GRACE_SECONDS)
        self._reap()

    def _reap(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._proc is not None:
            self._proc.join(timeout=0)
            if self._proc.exitcode is not None:
                self._proc.close()
        self._proc, self._conn, self._ready = None, None, False

    def stop(self) -> None:
        if self._proc is None:
            return
        try:
            self._conn.send(None)
        except (OSError, EOFError):
            pass
        self._proc.join(timeout=STOP_GRACE_SECONDS)
        self._kill()


class ProcessStage:
    """Runs a selected job through the engine (the inference process or a Ray actor pool) and
    records the outcome; with an engine of capacity > 1 the node calls it from several threads.

    An outcome the journal cannot record (SQLite: "database or disk is full") is kept here and
    recorded by `flush()` once space returns, before any new job starts, so a job is never left
    in 'processing' while the node runs. (After a restart, `Journal.recover` redoes such a job.)"""

    def __init__(self, inference: InferenceConfig, journal: Journal, spool: Spool, engine: InferenceProcess,
                 destinations: list[str], metrics=None):
        self.inference = inference
        self.journal = journal
        self.spool = spool
        self.engine = engine
        self.destinations = destinations
        self.metrics = metrics
        self._unrecorded: dict[int, tuple[JobState, dict]] = {}  # written from several threads: one key each

    def flush(self) -> bool:
        """Record outcomes that could not be recorded before; True when none is left."""
        for job_id, (state, fields) in list(self._unrecorded.items()):
            try:
                self.journal.transition(job_id, state, expect=JobState.PROCESSING, **fields)
            except sqlite3.OperationalError as exc:
                log.error("job %d: still cannot record '%s' in the journal: %s", job_id, state, exc)
                return False
            del self._unrecorded[job_id]
            log.warning("job %d: '%s' recorded now that the journal can be written", job_id, state)
        for job in self.journal.jobs([JobState.ENCODED]):  # encoded, but not yet handed to dispatch
            try:
                self.journal.start_deliveries(job.id, self.destinations)
            except sqlite3.OperationalError as exc:
                log.error("job %d: cannot start its deliveries yet: %s", job.id, exc)
                return False
        return True

    def _record(self, job_id: int, state: JobState, **fields) -> bool:
        try:
            self.journal.transition(job_id, state, expect=JobState.PROCESSING, **fields)
            return True
        except sqlite3.OperationalError as exc:  # e.g. disk full: keep it and try again later
            log.error("job %d: cannot record '%s' in the journal (%s); will retry", job_id, state, exc)
            self._unrecorded[job_id] = (state, fields)
            return False

    def process(self, job: Job) -> str:
        """Process a selected job; return its new state ('sending', 'done', 'selected' or 'failed')."""
        job = self.journal.transition(job.id, JobState.PROCESSING, expect=JobState.SELECTED)
        timings = dict(job.timings)
        started = time.perf_counter()
        out_dir = self.spool.output_dir(job.id)
        try:
            if out_dir.exists():  # a re-run must not send stale files from an earlier attempt
                self.spool.remove_tree(out_dir)
            request = ProcessRequest(job.id, job.study_uid, job.series_uid,
                                     tuple(i.path for i in self.journal.instances(job.series_uid)), str(out_dir))
            result = self.engine.run(request, timeout=self.inference.timeout_seconds)
        except InferenceUnavailable as exc:
            log.warning("job %d: %s; it waits in the queue", job.id, exc)
            self._record(job.id, JobState.SELECTED, error=str(exc)[:2000])
            return JobState.SELECTED
        except InferenceCrashed as exc:
            if job.attempts < self.inference.crash_retries:
                log.error("job %d: %s; retrying (attempt %d of %d)", job.id, exc, job.attempts + 2,
                          self.inference.crash_retries + 1)
                self._record(job.id, JobState.SELECTED, attempts=job.attempts + 1, error=str(exc)[:2000])
                return JobState.SELECTED
            return self._fail(job, str(exc), timings)
        except (InferenceFailed, InferenceTimeout) as exc:
            return self._fail(job, str(exc), timings)
        except Exception as exc:  # anything else on the node's side: the job must not stay 'processing'
            log.exception("job %d: unexpected error while processing", job.id)
            return self._fail(job, f"{type(exc).__name__}: {exc}", timings)
        timings.update({k: round(v, 4) for k, v in result["timings"].items()})
        timings["process_total"] = round(time.perf_counter() - started, 4)
        note = (f"{result['outputs']} images by {self.engine.info.get('name', '?')} in "
                f"{timings['process_total']:.2f} s ("
                + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items() if k != "process_total") + ")")
        if not self._record(job.id, JobState.ENCODED, output_dir=str(out_dir), outputs=result["outputs"],
                            timings=timings, error=None, note=note):
            return JobState.PROCESSING
        if self.metrics:
            for stage, seconds in timings.items():
                self.metrics.stage_seconds.labels(stage).observe(seconds)
        try:
            state = self.journal.start_deliveries(job.id, self.destinations)
        except sqlite3.OperationalError as exc:
            log.error("job %d: cannot start its deliveries yet (%s); will retry", job.id, exc)
            return JobState.ENCODED
        log.info("job %d: %d derived instances written in %.2f s", job.id, result["outputs"], timings["process_total"])
        return state

    def _fail(self, job: Job, reason: str, timings: dict) -> str:
        log.error("job %d: processing failed: %s", job.id, reason)
        self._record(job.id, JobState.FAILED, error=reason[:2000], timings=timings)
        if self.metrics:
            self.metrics.jobs_finished.labels("failed").inc()
        return JobState.FAILED
