"""The process stage: a selected job is handed to the inference engine (`dicomnode.engine.Engine`:
the local inference process or a Ray actor pool), which writes the synthetic instances to the
job's folder in the spool; the outcome is recorded in the journal and the deliveries start.
"""

from __future__ import annotations

import logging
import sqlite3
import time

from dicomnode.config import InferenceConfig
from dicomnode.engine import (
    Engine,
    InferenceCrashed,
    InferenceFailed,
    InferenceRefused,
    InferenceRequest,
    InferenceTimeout,
    InferenceUnavailable,
)
from dicomnode.journal import Job, JobState, Journal
from dicomnode.spool import Spool

log = logging.getLogger("dicomnode.process")


def recover(journal: Journal, destinations: list[str]) -> list[int]:
    """At start: jobs a stop or a crash caught mid-processing go back to 'selected' to be redone,
    and encoded jobs not yet handed to dispatch get their deliveries. Returns their ids."""
    ids = [j.id for j in journal.jobs([JobState.PROCESSING])]
    for job_id in ids:
        journal.transition(job_id, JobState.SELECTED, reason="recovered after restart")
    for job in journal.jobs([JobState.ENCODED]):
        journal.start_deliveries(job.id, destinations)
        ids.append(job.id)
    return ids


class ProcessStage:
    """Runs a selected job through the engine (the inference process or a Ray actor pool) and
    records the outcome; with an engine of capacity > 1 the node calls it from several threads.

    An outcome the journal cannot record (SQLite: "database or disk is full") is kept here and
    recorded by `flush()` once space returns, before any new job starts, so a job is never left
    in 'processing' while the node runs. (After a restart, `Journal.recover` redoes such a job.)"""

    def __init__(self, inference: InferenceConfig, journal: Journal, spool: Spool, engine: Engine,
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

    def process(self, job: Job) -> JobState:
        """Process a selected job; return its new state (sending, done, selected, encoded, ignored or failed)."""
        job = self.journal.transition(job.id, JobState.PROCESSING, expect=JobState.SELECTED)
        timings = dict(job.timings)
        started = time.perf_counter()
        out_dir = self.spool.output_dir(job.id)
        try:
            if out_dir.exists():  # a re-run must not send stale files from an earlier attempt
                self.spool.remove_tree(out_dir)
            request = InferenceRequest(job.id, job.study_uid, job.series_uid,
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
        except InferenceRefused as exc:
            return self._refuse(job, exc, timings)
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
            self.metrics.observe_safety(result["metrics"])
        try:
            state = self.journal.start_deliveries(job.id, self.destinations)
        except sqlite3.OperationalError as exc:
            log.error("job %d: cannot start its deliveries yet (%s); will retry", job.id, exc)
            return JobState.ENCODED
        log.info("job %d: %d derived instances written in %.2f s", job.id, result["outputs"], timings["process_total"])
        return state

    def _refuse(self, job: Job, exc: InferenceRefused, timings: dict) -> JobState:
        """The safety gate refused the series: the job ends 'ignored' with the reason (audit trail)."""
        log.warning("job %d: not synthesised: %s", job.id, exc.reason)
        self._record(job.id, JobState.IGNORED, reason=exc.reason[:2000], timings=timings)
        if self.metrics:
            self.metrics.observe_safety({f"{exc.check}_refused": 1.0,
                                         **({"input_score": exc.score} if exc.score is not None else {})})
            self.metrics.jobs_finished.labels(JobState.IGNORED).inc()
        return JobState.IGNORED

    def _fail(self, job: Job, reason: str, timings: dict) -> JobState:
        log.error("job %d: processing failed: %s", job.id, reason)
        self._record(job.id, JobState.FAILED, error=reason[:2000], timings=timings)
        if self.metrics:
            self.metrics.jobs_finished.labels(JobState.FAILED).inc()
        return JobState.FAILED
