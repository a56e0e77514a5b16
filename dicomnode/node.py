"""The node: the one place that knows every stage and wires them from the config.

receive -> spool + journal -> assemble (completion) -> selection (rules)
-> process (inference + encoding, in the inference process) -> dispatch

Each stage after the receiver runs in its own loop thread and talks to the others only
through the journal; a `threading.Event` wakes a loop early when there is new work. The
processor itself (the model) runs in an inference engine (`dicomnode.engine`): a child process
(`dicomnode.localengine`) or a pool of Ray actors (`dicomnode.cluster`).
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from dicomnode import netinternals
from dicomnode.assemble import Assembler
from dicomnode.config import Config
from dicomnode.dispatch import Dispatcher
from dicomnode.engine import Engine, InferenceCrashed, ProcessorSpec
from dicomnode.health import Check, Heartbeats, HttpEndpoints, Report, SystemdNotifier, writable
from dicomnode.infer import heap
from dicomnode.journal import ACTIVE_STATES, Job, JobState, Journal
from dicomnode.localengine import InferenceProcess
from dicomnode.metrics import Metrics
from dicomnode.process import ProcessStage, recover
from dicomnode.receive import StoreSCP
from dicomnode.retention import start_scheduler
from dicomnode.selection import Selector
from dicomnode.spool import Spool
from dicomnode.webreceive import StowService

log = logging.getLogger("dicomnode.node")

ASSEMBLER_TICK = 0.1
WORKER_TICK = 0.5
DISPATCH_TICK = 0.25
TRIM_INTERVAL = 60.0
STOP_GRACE_SECONDS = 5.0  # for deliveries under way when the node stops


class StartError(RuntimeError):
    """The node cannot start; the message names the config key to change."""


class ModelStartError(StartError):
    """The inference process could not build its processor (load the model)."""


def _bind_error(what: str, key: str, host: str, port: int, exc: OSError) -> StartError:
    reason = "already in use by another program" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
    return StartError(f"{key}: cannot listen for {what} on {host}:{port}: {reason}")


class _Loop(threading.Thread):
    """Calls `step` until stopped; `step` returns True when it did work (then it runs again at once)."""

    def __init__(self, name: str, step: Callable[[], bool], interval: float, stop: threading.Event,
                 beat: Callable[[str], None]):
        super().__init__(name=name, daemon=True)
        self.step, self.interval, self.stop_event, self.beat = step, interval, stop, beat
        self.wake = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.beat(self.name)
            try:
                busy = self.step()
            except Exception:  # a stage error is logged and the loop goes on
                log.exception("%s: unexpected error", self.name)
                busy = False
            if not busy:
                self.wake.wait(self.interval)
                self.wake.clear()


class Node:
    """`processor`: None (receive, select and dispatch only), a picklable Processor, or a picklable
    factory that builds one (e.g. `Synthesis`); it runs in the inference process."""

    def __init__(self, cfg: Config, processor: ProcessorSpec | None = None, *, serve_metrics: bool = True,
                 on_progress: Callable[[int, int], None] | None = None):
        self.cfg = cfg
        self.spool = Spool(cfg.node.storage_dir)
        self.journal = Journal(cfg.journal_path, audit_file=cfg.logging.audit_file)
        self.metrics = Metrics(self.journal, self.spool)
        self.scp = StoreSCP(cfg, self.spool, self.journal, self.metrics)
        self.stow = StowService(cfg, self.scp, self.metrics) if cfg.dicomweb.enabled else None
        self.assembler = Assembler(cfg.series, self.journal, self.metrics)
        self.selector = Selector(cfg.rules, self.journal, self.metrics)
        self.heartbeats = Heartbeats()
        self.notifier = SystemdNotifier()
        self.engine = self._make_engine(processor, on_progress) if processor is not None else None
        self.worker = ProcessStage(cfg.inference, self.journal, self.spool, self.engine,
                                   [d.name for d in cfg.destinations], self.metrics) if self.engine else None
        self.dispatcher = Dispatcher(cfg, self.journal, self.metrics, on_slot_free=lambda: self._wake("dispatcher"))
        self._serve_metrics = serve_metrics and cfg.metrics.enabled
        self._stop = threading.Event()
        self._loops: list[_Loop] = []
        self._scheduler = None
        self._metrics_server: HttpEndpoints | None = None
        self._last_trim = time.monotonic()
        self._in_flight: set[int] = set()  # job ids being processed by the pool (engines of capacity > 1)
        self._in_flight_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def _make_engine(self, processor: ProcessorSpec, on_progress: Callable[[int, int], None] | None) -> Engine:
        inference = self.cfg.inference
        if inference.backend == "ray":
            from dicomnode.cluster import RayEngine  # imports Ray; only when configured

            return RayEngine(processor, inference, on_restart=self._on_engine_restart)
        return InferenceProcess(processor, start_timeout=inference.start_timeout_seconds, on_progress=on_progress,
                                on_restart=self._on_engine_restart, on_wait=lambda: self.heartbeats.beat("worker"))

    # -- stage steps ------------------------------------------------------------------------
    def _assemble_step(self) -> bool:
        if time.monotonic() - self._last_trim > TRIM_INTERVAL:  # hand freed memory back to the kernel
            self._last_trim = time.monotonic()
            heap.trim()
        completed = self.assembler.complete_due()
        for job in self.journal.jobs([JobState.COMPLETE]):
            try:
                self.selector.select(job)
            except Exception as exc:  # one malformed series must not stall selection of the others
                log.exception("job %d: selection failed", job.id)
                self.journal.transition(job.id, JobState.FAILED, expect=JobState.COMPLETE,
                                        error=f"selection: {exc}"[:2000])
            self._wake("worker")
        return bool(completed)

    def _work_step(self) -> bool:
        worker, engine = self.worker, self.engine
        if worker is None or engine is None:
            return False
        engine.ensure_started()
        if not worker.flush():  # an earlier outcome still waits for the journal (disk full)
            return False
        if engine.hold_jobs_while_unready and not engine.ready:
            return False  # e.g. the Ray cluster is unreachable: jobs stay 'selected'
        if self._pool is None:  # one job at a time, on this thread
            jobs = self.journal.jobs([JobState.SELECTED], limit=1)
            if not jobs or self._stop.is_set():
                return False
            if worker.process(jobs[0]) == JobState.SENDING:
                self._wake("dispatcher")
            return True
        with self._in_flight_lock:
            free = engine.capacity - len(self._in_flight)
            if free <= 0 or self._stop.is_set():
                return False
            jobs = [j for j in self.journal.jobs([JobState.SELECTED], limit=engine.capacity * 2)
                    if j.id not in self._in_flight][:free]
            self._in_flight.update(j.id for j in jobs)
        for job in jobs:
            self._pool.submit(self._process_in_pool, job, worker)
        return False  # the pool's threads wake this loop when a slot frees up

    def _process_in_pool(self, job: Job, worker: ProcessStage) -> None:
        try:
            if worker.process(job) == JobState.SENDING:
                self._wake("dispatcher")
        except Exception:  # ProcessStage records every outcome; this is the last line of defence
            log.exception("job %d: unexpected error in the processing pool", job.id)
        finally:
            with self._in_flight_lock:
                self._in_flight.discard(job.id)
            self._wake("worker")

    def _on_engine_restart(self, reason: str) -> None:
        self.metrics.inference_restarts.labels(reason).inc()

    def _dispatch_step(self) -> bool:
        return self.dispatcher.run_due() > 0

    def _wake(self, name: str) -> None:
        for loop in self._loops:
            if loop.name == name:
                loop.wake.set()

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> "Node":
        try:
            netinternals.check()
        except netinternals.PynetdicomIncompatible as exc:
            raise StartError(str(exc)) from None
        heap.limit_arenas(2)
        self.assembler.started_at = time.time()
        orphans = self.spool.remove_orphans()
        if orphans:
            log.warning("removed %d temporary file(s) left by an interrupted write", orphans)
        recovered = recover(self.journal, [d.name for d in self.cfg.destinations])
        if recovered:
            log.warning("re-queued %d job(s) interrupted by a restart", len(recovered))
        if self.engine is None:
            log.warning("no synthesiser loaded: selected series wait in the queue until one is configured")
        elif self.engine.capacity > 1 or self.engine.hold_jobs_while_unready:
            # a cluster: the node receives while it connects; /readyz says when the actors are up
            self._pool = ThreadPoolExecutor(self.engine.capacity, thread_name_prefix="dicomnode-job")
            self.engine.start(wait_ready=False)
        else:
            try:  # the model is loaded before the node listens, as an operator expects of a started node
                self.engine.start(wait_ready=True)
            except InferenceCrashed as exc:
                raise ModelStartError(str(exc)) from None
        beat = self.heartbeats.beat
        self._loops = [
            _Loop("assembler", self._assemble_step, ASSEMBLER_TICK, self._stop, beat),
            _Loop("worker", self._work_step, WORKER_TICK, self._stop, beat),
            _Loop("dispatcher", self._dispatch_step, DISPATCH_TICK, self._stop, beat),
        ]
        for loop in self._loops:
            loop.start()
        self._scheduler = start_scheduler(self.cfg.retention, self.journal, self.spool)
        node, metrics = self.cfg.node, self.cfg.metrics
        try:
            if self._serve_metrics:
                try:
                    self._metrics_server = HttpEndpoints(metrics.host, metrics.port, self.metrics.registry,
                                                         self.health, self.readiness).start()
                except OSError as exc:
                    raise _bind_error("Prometheus metrics", "[metrics].port", metrics.host, metrics.port, exc) from None
            try:
                self.scp.start()
            except OSError as exc:
                raise _bind_error("DICOM", "[node].port", node.host, node.port, exc) from None
            if self.stow is not None:
                web = self.cfg.dicomweb
                try:
                    self.stow.start()
                except OSError as exc:
                    raise _bind_error("STOW-RS", "[dicomweb].port", web.host, web.port, exc) from None
        except StartError:
            self.stop()
            raise
        self.metrics.up.set(1)
        self.notifier.send("READY=1", f"STATUS={self.status_line()}")
        self.notifier.start_watchdog(self.health, self.status_line)
        return self

    # -- health -----------------------------------------------------------------------------
    def health(self) -> Report:
        """Liveness: every stage loop has beaten recently."""
        report = self.heartbeats.report()
        if not report.checks:
            report.checks.append(Check("loops", False, "not started"))
        return report

    def readiness(self) -> Report:
        """Readiness: model loaded, spool writable, free disk above the watermark, SCP listening."""
        checks = []
        if self.engine is None:
            checks.append(Check("model", True, "no model configured (receive, select and dispatch only)"))
        else:
            checks.append(Check("model", *self.engine.status()))
        checks.append(Check("spool_writable", writable(self.spool.root), str(self.spool.root)))
        free, low = self.spool.free_mb(), self.cfg.node.min_free_disk_mb
        checks.append(Check("disk", free >= low, f"{free:.0f} MB free, watermark {low} MB"))
        listening = self.scp._server is not None
        checks.append(Check("scp", listening, f"{self.cfg.node.ae_title} on port {self.scp.port}" if listening
                            else "not listening"))
        if self.stow is not None:
            checks.append(Check("stow", self.stow.listening, f"STOW-RS on port {self.stow.port}" if self.stow.listening
                                else "not listening"))
        return Report(checks)

    def status_line(self) -> str:
        counts = self.journal.state_counts()
        last = self.journal.last_job()
        tail = f"; last job {last.id} {last.state}" if last else ""
        return (f"{counts['received'] + counts['complete']} series arriving, {counts['selected']} waiting, "
                f"{counts['processing']} processing, {counts['sending']} sending, {counts['dead_letter']} dead letter"
                f"{tail}")

    def stop(self) -> None:
        self.notifier.stop()  # STOPPING=1 first, as sd_notify(3) asks
        self.metrics.up.set(0)
        if self.stow is not None:
            self.stow.stop()
        self.scp.stop()
        self._stop.set()
        for loop in self._loops:
            loop.wake.set()
        for loop in self._loops:
            loop.join(timeout=10)
        self._stop_dispatch()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
        if self._metrics_server is not None:
            self._metrics_server.stop()
        if self.engine is not None:
            self.engine.stop()  # jobs still on a Ray actor go back to the queue ('selected')
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self.journal.close()

    def _stop_dispatch(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Start no delivery; give those under way `grace` seconds to end. One still waiting on a
        silent peer then ends on its own within that destination's timeouts, and records its
        outcome; a process that exits waits for it."""
        self.dispatcher.stop(wait=False)
        deadline = time.monotonic() + grace
        while self.dispatcher.in_flight() and time.monotonic() < deadline:
            time.sleep(0.05)

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until no job is active (for tests and the demo)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            counts = self.journal.state_counts()
            busy = [s for s in ACTIVE_STATES if s != JobState.SELECTED or self.worker is not None]
            if not any(counts[s] for s in busy):
                return True
            time.sleep(0.05)
        return False

    def __enter__(self) -> "Node":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
