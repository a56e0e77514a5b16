"""The job stages between completion and dispatch: select, then process (synthesise + encode).

Both read their inputs from the journal and the spool and record their outcome as a job
state transition, so a restart picks up exactly where the node stopped.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import time
from pathlib import Path

from pydicom import dcmread

from .config import Config
from .journal import Job, Journal
from .records import CompleteSeries, Processor
from .rules import Decision, evaluate, read_headers
from .spool import Spool, check_uid, write_dataset

log = logging.getLogger("dicomnode.pipeline")


class Selector:
    def __init__(self, cfg: Config, journal: Journal, metrics=None):
        self.cfg = cfg
        self.journal = journal
        self.metrics = metrics

    def select(self, job: Job) -> Decision:
        started = time.perf_counter()
        paths = [Path(i.path) for i in self.journal.instances(job.series_uid)]
        groups, bad = read_headers(paths)
        headers = groups.get(job.series_uid, [])
        decision = evaluate(self.cfg.rules, job.series_uid, headers)
        if bad and decision.matched:
            decision.matched = False
            decision.reason = f"{len(bad)} unreadable instance(s), e.g. {bad[0][0].name}: {bad[0][1]}"
        timings = dict(job.timings, select=round(time.perf_counter() - started, 4))
        if decision.matched:
            self.journal.transition(job.id, "selected", expect="complete", rule=decision.rule, reason=decision.reason,
                                    timings=timings)
            log.info("job %d: selected (rule %s)", job.id, decision.rule)
        else:
            self.journal.transition(job.id, "ignored", expect="complete", reason=decision.reason, timings=timings)
            failed = [c["check"] for c in decision.checks if not c["ok"]] or ["unreadable"]
            log.info("job %d: ignored (failed: %s)", job.id, ", ".join(dict.fromkeys(failed)))
        if self.metrics:
            self.metrics.series_selected.labels(str(decision.matched).lower()).inc()
            if not decision.matched:
                self.metrics.jobs_finished.labels("ignored").inc()
        return decision


class Worker:
    """Runs the processor on one selected job at a time, with a watchdog timeout."""

    def __init__(self, cfg: Config, journal: Journal, spool: Spool, processor: Processor, metrics=None):
        self.cfg = cfg
        self.journal = journal
        self.spool = spool
        self.processor = processor
        self.metrics = metrics
        self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="processor")
        self._abandoned: cf.Future | None = None  # a run the watchdog gave up on, still holding the engine

    def blocked(self) -> bool:
        """True while a timed-out run is still going: new jobs wait in 'selected' rather than
        piling up behind it."""
        if self._abandoned is not None and self._abandoned.done():
            log.warning("the processor run abandoned by the watchdog has ended; resuming")
            self._abandoned = None
        return self._abandoned is not None

    def process(self, job: Job) -> str:
        """Process a selected job; return its new state ('sending', 'done' or 'failed')."""
        job = self.journal.transition(job.id, "processing", expect="selected")
        timings = dict(job.timings)
        started = time.perf_counter()
        try:
            instances = self.journal.instances(job.series_uid)
            t0 = time.perf_counter()
            datasets = [dcmread(i.path) for i in instances]
            timings["load"] = round(time.perf_counter() - t0, 4)
            series = CompleteSeries(job.id, job.study_uid, job.series_uid, tuple(Path(i.path) for i in instances))
            future = self._pool.submit(self.processor.process, series, datasets)
            try:
                result = future.result(timeout=self.cfg.inference.timeout_seconds)
            except cf.TimeoutError:
                self._abandoned = future
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="processor")
                raise TimeoutError(f"processing exceeded the {self.cfg.inference.timeout_seconds:g} s watchdog")
            timings.update({k: round(v, 4) for k, v in result.timings.items()})
            if not result.datasets:
                raise ValueError("the processor returned no images")
            t0 = time.perf_counter()
            out_dir = self.spool.output_dir(job.id)
            if out_dir.exists():  # a re-run must not send stale files from an earlier attempt
                self.spool.remove_tree(out_dir)
            for ds in result.datasets:
                write_dataset(out_dir / f"{check_uid(ds.SOPInstanceUID, 'output SOP Instance UID')}.dcm", ds)
            timings["write"] = round(time.perf_counter() - t0, 4)
        except Exception as exc:  # the job fails with its reason; the daemon keeps serving
            reason = f"{type(exc).__name__}: {exc}"
            log.error("job %d: processing failed: %s", job.id, reason)
            self.journal.transition(job.id, "failed", expect="processing", error=reason[:2000], timings=timings)
            if self.metrics:
                self.metrics.jobs_finished.labels("failed").inc()
            return "failed"
        timings["process_total"] = round(time.perf_counter() - started, 4)
        self.journal.transition(job.id, "encoded", expect="processing", output_dir=str(out_dir),
                                outputs=len(result.datasets), timings=timings)
        if self.metrics:
            for stage, seconds in timings.items():
                self.metrics.stage_seconds.labels(stage).observe(seconds)
        state = self.journal.start_deliveries(job.id, [d.name for d in self.cfg.destinations])
        log.info("job %d: %d derived instances written in %.2f s", job.id, len(result.datasets),
                 timings["process_total"])
        return state

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
