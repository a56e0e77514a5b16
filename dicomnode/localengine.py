"""The local inference engine: the model runs in one child process on this machine.

Why a separate process: a watchdog cannot stop a thread, and a segfault, an abort in a native
library or an out-of-memory kill would take the C-STORE SCP down with it. The inference process
is spawned once, builds its processor (loads the model) once and stays warm; the node sends it
job ids and file paths over a pipe, never pixel data. A job that exceeds the watchdog gets the
process killed and a fresh one started; a process that dies is replaced; either way the job ends
with the reason (or is retried, `[inference] crash_retries`) and the node keeps receiving.
Implements `dicomnode.engine.Engine`.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Callable

from dicomnode.engine import (
    EngineResult,
    InferenceCrashed,
    InferenceFailed,
    InferenceRefused,
    InferenceRequest,
    InferenceTimeout,
    ProcessorSpec,
    build_processor,
    describe_processor,
    output_name,
    run_processor,
)
from dicomnode.records import Processor

log = logging.getLogger("dicomnode.localengine")

STOP_GRACE_SECONDS = 5.0


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


def _child_main(conn: Connection, processor_spec: ProcessorSpec) -> None:
    """Build the processor, say ready, then run requests until told to stop or the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the node; the node stops us
    _exit_with_parent()
    try:
        processor = build_processor(processor_spec)
    except BaseException as exc:  # noqa: BLE001 - reported to the node, which decides
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    if hasattr(processor, "progress"):
        processor.progress = lambda done, total: conn.send(("progress", done, total))
    conn.send(("ready", {**describe_processor(processor), "pid": os.getpid()}))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        try:
            conn.send(("done", _run(processor, request)))
        except InferenceRefused as exc:  # the safety gate: not a failure of the job
            conn.send(("refused", exc.check, exc.reason, exc.score))
        except Exception as exc:  # one bad series fails its job; the process goes on
            conn.send(("failed", f"{type(exc).__name__}: {exc}"))


def _run(processor: Processor, req: InferenceRequest) -> EngineResult:
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

    def __init__(self, processor_spec: ProcessorSpec, *, start_timeout: float = 600.0,
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

    def run(self, request: InferenceRequest, timeout: float) -> EngineResult:
        """Run one job; raise InferenceFailed / InferenceRefused / InferenceCrashed / InferenceTimeout with
        the reason."""
        if self._proc is None or not self._proc.is_alive():
            self._reap()
            self.start(wait_ready=False)
        if not self.ready:
            self._await_ready(self.start_timeout)
        with self._pipe:
            return self._exchange(request, timeout)

    def _live(self) -> tuple[mp.process.BaseProcess, Connection]:
        """The running process and its pipe (InferenceCrashed when there is none)."""
        if self._proc is None or self._conn is None:
            raise InferenceCrashed("the inference process is not running")
        return self._proc, self._conn

    def _exchange(self, request: InferenceRequest, timeout: float) -> EngineResult:
        deadline = time.monotonic() + timeout
        _, conn = self._live()
        try:
            conn.send(request)
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
            if kind == "refused":
                raise InferenceRefused(*payload)
            raise InferenceFailed(payload[0])

    def _receive(self, deadline: float, *, what: str, timeout_s: float | None = None) -> tuple:
        """The next message, or: the process died -> InferenceCrashed; deadline -> kill, InferenceTimeout."""
        proc, conn = self._live()
        while True:
            left = deadline - time.monotonic()
            ready = wait([conn, proc.sentinel], timeout=min(1.0, max(0.0, left)))
            if self.on_wait is not None:
                self.on_wait()
            if conn in ready:
                try:
                    return conn.recv()
                except (EOFError, OSError):
                    pass  # the pipe closed: the process is gone; fall through to the exit status
            if conn in ready or proc.sentinel in ready:
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
        proc, _ = self._live()
        proc.join(timeout=STOP_GRACE_SECONDS)
        why = _describe_exit(proc.exitcode)
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
        if self._proc is None or self._conn is None:
            return
        try:
            self._conn.send(None)
        except (OSError, EOFError):
            pass
        self._proc.join(timeout=STOP_GRACE_SECONDS)
        self._kill()
