"""The node: the one place that knows every stage and wires them from the config.

receive (net.scp) -> spool + journal -> series (completion) -> rules (selection)
-> pipeline.Worker (processor: synthesise + encode) -> dispatch

Each stage after the receiver runs in its own loop thread and talks to the others only
through the journal; a `threading.Event` wakes a loop early when there is new work.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from typing import Callable

from .config import Config
from .dispatch import Dispatcher
from .journal import Journal
from .metrics import Metrics
from .net.scp import StoreSCP
from .pipeline import Selector, Worker
from .records import Processor
from .retention import start_scheduler
from .series import Assembler
from .spool import Spool

log = logging.getLogger("dicomnode.node")

ASSEMBLER_TICK = 0.1
WORKER_TICK = 0.5
DISPATCH_TICK = 0.25


class StartError(RuntimeError):
    """The node cannot start; the message names the config key to change."""


def _bind_error(what: str, key: str, host: str, port: int, exc: OSError) -> StartError:
    reason = "already in use by another program" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
    return StartError(f"{key}: cannot listen for {what} on {host}:{port}: {reason}")


class _Loop(threading.Thread):
    """Calls `step` until stopped; `step` returns True when it did work (then it runs again at once)."""

    def __init__(self, name: str, step: Callable[[], bool], interval: float, stop: threading.Event):
        super().__init__(name=name, daemon=True)
        self.step, self.interval, self.stop_event = step, interval, stop
        self.wake = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                busy = self.step()
            except Exception:  # a stage error is logged and the loop goes on
                log.exception("%s: unexpected error", self.name)
                busy = False
            if not busy:
                self.wake.wait(self.interval)
                self.wake.clear()


class Node:
    def __init__(self, cfg: Config, processor: Processor | None = None, *, serve_metrics: bool = True):
        self.cfg = cfg
        self.spool = Spool(cfg.node.storage_dir)
        self.journal = Journal(cfg.journal_path)
        self.metrics = Metrics(self.journal, self.spool)
        self.processor = processor
        self.scp = StoreSCP(cfg, self.spool, self.journal, self.metrics, on_stored=self._on_stored)
        self.assembler = Assembler(cfg.series, self.journal, self.metrics)
        self.selector = Selector(cfg, self.journal, self.metrics)
        self.worker = Worker(cfg, self.journal, self.spool, processor, self.metrics) if processor else None
        self.dispatcher = Dispatcher(cfg, self.journal, self.metrics)
        self._serve_metrics = serve_metrics and cfg.metrics.enabled
        self._stop = threading.Event()
        self._loops: list[_Loop] = []
        self._scheduler = None
        self._metrics_server = None

    # -- stage steps ------------------------------------------------------------------------
    def _assemble_step(self) -> bool:
        completed = self.assembler.complete_due()
        for job in self.journal.jobs(["complete"]):
            try:
                self.selector.select(job)
            except Exception as exc:  # one malformed series must not stall selection of the others
                log.exception("job %d: selection failed", job.id)
                self.journal.transition(job.id, "failed", expect="complete", error=f"selection: {exc}"[:2000])
            self._wake("worker")
        return bool(completed)

    def _work_step(self) -> bool:
        if self.worker is None:
            return False
        jobs = self.journal.jobs(["selected"], limit=1)
        if not jobs or self.worker.blocked():
            return False
        if self.worker.process(jobs[0]) == "sending":
            self._wake("dispatcher")
        return True

    def _dispatch_step(self) -> bool:
        return self.dispatcher.run_due() > 0

    def _on_stored(self, job_id: int | None) -> None:
        self._wake("assembler")

    def _wake(self, name: str) -> None:
        for loop in self._loops:
            if loop.name == name:
                loop.wake.set()

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> "Node":
        recovered = self.journal.recover([d.name for d in self.cfg.destinations])
        if recovered:
            log.warning("re-queued %d job(s) interrupted by a restart", len(recovered))
        if self.worker is None:
            log.warning("no synthesiser loaded: selected series wait in the queue until one is configured")
        self._loops = [
            _Loop("assembler", self._assemble_step, ASSEMBLER_TICK, self._stop),
            _Loop("worker", self._work_step, WORKER_TICK, self._stop),
            _Loop("dispatcher", self._dispatch_step, DISPATCH_TICK, self._stop),
        ]
        for loop in self._loops:
            loop.start()
        self._scheduler = start_scheduler(self.cfg.retention, self.journal, self.spool)
        node, metrics = self.cfg.node, self.cfg.metrics
        try:
            if self._serve_metrics:
                try:
                    self._metrics_server = self.metrics.serve(metrics.host, metrics.port)
                except OSError as exc:
                    raise _bind_error("Prometheus metrics", "[metrics].port", metrics.host, metrics.port, exc) from None
            try:
                self.scp.start()
            except OSError as exc:
                raise _bind_error("DICOM", "[node].port", node.host, node.port, exc) from None
        except StartError:
            self.stop()
            raise
        self.metrics.up.set(1)
        return self

    def stop(self) -> None:
        self.metrics.up.set(0)
        self.scp.stop()
        self._stop.set()
        for loop in self._loops:
            loop.wake.set()
        for loop in self._loops:
            loop.join(timeout=10)
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
        if self._metrics_server is not None:
            server, thread = self._metrics_server
            server.shutdown()
            server.server_close()
        if self.worker is not None:
            self.worker.close()
        self.journal.close()

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until no job is active (for tests and the demo)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            counts = self.journal.state_counts()
            if not any(counts[s] for s in ("received", "complete", "processing", "encoded", "sending")) and \
                    not (counts["selected"] and self.worker is not None):
                return True
            time.sleep(0.05)
        return False

    def __enter__(self) -> "Node":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
