"""Dispatch: deliver a job's encoded files to every configured destination.

Each destination has its own delivery row in the journal and its own pool of sending threads,
at most `max_associations` of them (one association, one job each): deliveries to different
destinations, and of different jobs, proceed at once, and a destination that never answers
holds up only its own pool. A destination that cannot be reached (refused, silent, lost) is held
as a whole: until its own backoff has passed, its other due deliveries are deferred without a
connection attempt each (their give-up clock runs), and then one attempt probes it again.

The journal records each result instance a destination acknowledges, before the next one is
sent; an attempt sends only the instances not yet acknowledged, so an association lost after k
of n instances is followed by a retry of the other n - k. A failed attempt is retried with
capped exponential backoff and jitter; once the next attempt would fall past
`give_up_after_seconds` from the first, the delivery goes to the dead letter (re-driven by
`dicomnode queue retry`; `dicomnode queue resend` sends every instance again). Dispatch knows
nothing about images: it sends files, named by their SOP Instance UID (`engine.output_name`), by
C-STORE (`scu`) or by STOW-RS (`stow`), as the destination says.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from dicomnode.config import Config, DestinationConfig
from dicomnode.journal import Delivery, DeliveryState, JobState, Journal
from dicomnode.scu import AssociationFailed, Timeouts, client_tls_context, collect_files, store_files
from dicomnode.stow import StowRefused, StowUnreachable, stow_files

log = logging.getLogger("dicomnode.dispatch")


def backoff_delay(attempts: int, initial: float, cap: float, rng: random.Random | None = None) -> float:
    """Delay before attempt `attempts + 1`: initial * 2^(attempts-1), capped, with 50-100% jitter."""
    base = min(cap, initial * 2 ** max(0, attempts - 1))
    return base * (0.5 + 0.5 * (rng or random).random())


def timeouts(dest: DestinationConfig) -> Timeouts:
    return Timeouts(dest.connect_timeout, dest.acse_timeout, dest.dimse_timeout, dest.network_timeout)


class Dispatcher:
    """`run_due` (the node's dispatch loop) hands due deliveries to their destination's pool and
    returns at once; `attempt` is one delivery attempt, on the calling thread. `on_slot_free` is
    called when an attempt in a pool ends, so the loop can start the next one without waiting
    for its tick."""

    def __init__(self, cfg: Config, journal: Journal, metrics=None, on_slot_free: Callable[[], None] | None = None):
        self.cfg = cfg
        self.journal = journal
        self.metrics = metrics
        self.on_slot_free = on_slot_free
        self.destinations = {d.name: d for d in cfg.destinations}
        self._rng = random.Random()
        self._lock = threading.Lock()
        self._in_flight: set[tuple[int, str]] = set()  # (job id, destination) being attempted
        self._pools: dict[str, ThreadPoolExecutor] = {}
        # destination -> (held until, consecutive unreachable attempts, last error): see `_held`
        self._down: dict[str, tuple[float, int, str]] = {}
        if metrics is not None:
            for name in self.destinations:
                metrics.destination_reachable.labels(name).set(1)

    def run_due(self, now: float | None = None) -> int:
        """Start every due delivery whose destination has a free slot; return how many started."""
        started = 0
        deferred: list[tuple[int, str, float, str]] = []  # written in one transaction, not one each
        for delivery in self.journal.due_deliveries(time.time() if now is None else now):
            dest = self.destinations.get(delivery.destination)
            key = (delivery.job_id, delivery.destination)
            if dest is None:  # no pool to wait for: it is dead-lettered at once, saying why
                started += self.attempt(delivery) is not None
                continue
            with self._lock:
                if key in self._in_flight:
                    continue
            if self._held(delivery, deferred):
                continue
            with self._lock:
                busy = sum(1 for _, name in self._in_flight if name == dest.name)
                if key in self._in_flight or busy >= dest.max_associations:
                    continue
                self._in_flight.add(key)
                pool = self._pools.get(dest.name)
                if pool is None:
                    pool = self._pools[dest.name] = ThreadPoolExecutor(
                        dest.max_associations, thread_name_prefix=f"dicomnode-send-{dest.name}")
            pool.submit(self._attempt_in_pool, delivery, key)
            started += 1
        if deferred:
            self.journal.defer_deliveries(deferred)
        return started

    def _held(self, delivery: Delivery, deferred: list[tuple[int, str, float, str]]) -> bool:
        """While its destination is held, defer a due delivery to the end of the hold (appended to
        `deferred`), or send it to the dead letter once past `give_up_after_seconds`; True when
        it was either."""
        with self._lock:
            down = self._down.get(delivery.destination)
            probing = any(name == delivery.destination for _, name in self._in_flight)
        now = time.time()
        if down is None or (now >= down[0] and not probing):
            return False
        until, _, error = down
        until = max(until, now + 1.0)  # while a probe is under way, look again in a second
        first = delivery.first_attempt_at or now
        d = self.cfg.dispatch
        if until - first > d.give_up_after_seconds:
            state = self.journal.record_attempt(delivery.job_id, delivery.destination, ok=False, dead=True,
                                                error=error, next_attempt_at=until)
            log.error("job %d: delivery to %s dead-lettered: unreachable for %.0f s: %s", delivery.job_id,
                      delivery.destination, now - first, error)
            self._count(delivery.destination, "dead_letter")
            if self.metrics and state == JobState.DEAD_LETTER:
                self.metrics.jobs_finished.labels(JobState.DEAD_LETTER).inc()
        else:
            deferred.append((delivery.job_id, delivery.destination, until + self._rng.uniform(0, 1.0),
                             f"not attempted: destination held after: {error}"))
        return True

    def _note_reachable(self, name: str, reachable: bool, error: str | None) -> None:
        """Hold a destination after an attempt that could not reach it; release it after one that did."""
        if self.metrics is not None:
            self.metrics.destination_reachable.labels(name).set(1 if reachable else 0)
        with self._lock:
            if reachable:
                if self._down.pop(name, None) is not None:
                    log.info("destination %s reachable again", name)
                return
            _, failures, _ = self._down.get(name, (0.0, 0, ""))
            d = self.cfg.dispatch
            delay = backoff_delay(failures + 1, d.backoff_initial_seconds, d.backoff_max_seconds, self._rng)
            self._down[name] = (time.time() + delay, failures + 1, error or "unreachable")
        if failures == 0:
            log.warning("destination %s unreachable: its deliveries wait, probed again with backoff: %s", name, error)

    def _attempt_in_pool(self, delivery: Delivery, key: tuple[int, str]) -> None:
        try:
            self.attempt(delivery)
        except Exception:  # the journal could not record the outcome: the delivery stays due
            log.exception("job %d: delivery to %s could not be recorded", *key)
        finally:
            with self._lock:
                self._in_flight.discard(key)
            if self.on_slot_free is not None:
                self.on_slot_free()

    def in_flight(self) -> int:
        with self._lock:
            return len(self._in_flight)

    def stop(self, wait: bool = True) -> None:
        """Start nothing more; with `wait`, let the attempts under way end (each is bounded by its
        destination's timeouts)."""
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.shutdown(wait=wait, cancel_futures=True)

    def attempt(self, delivery: Delivery) -> bool | None:
        """One delivery attempt: True delivered, False failed; None when the job is not sending."""
        job = self.journal.job(delivery.job_id)
        dest = self.destinations.get(delivery.destination)
        if job is None or job.state != JobState.SENDING:
            return None
        current = next((d for d in self.journal.deliveries(job.id) if d.destination == delivery.destination), None)
        if current is None or current.state != DeliveryState.PENDING:  # settled meanwhile (e.g. a purge, a dead letter)
            return None
        started = time.perf_counter()
        sent: list[int] = [0, 0]  # [already acknowledged before this attempt, sent now]
        if dest is None:
            error: str | None = f"destination {delivery.destination!r} is no longer configured"
        else:
            try:
                error, reachable = self._send(job.id, dest, Path(job.output_dir or ""), sent)
            except Exception as exc:  # any failure takes the backoff / dead-letter path
                error, reachable = f"{type(exc).__name__}: {exc}", True
            self._note_reachable(dest.name, reachable, error)
        seconds = time.perf_counter() - started
        if error is None:
            state = self.journal.record_attempt(job.id, delivery.destination, ok=True)
            resumed = f"; {sent[0]} acknowledged before" if sent[0] else ""
            log.info("job %d: delivered to %s in %.2f s (%d instances sent%s)", job.id, delivery.destination,
                     seconds, sent[1], resumed)
            self._count(delivery.destination, "delivered")
            if self.metrics and state == JobState.DONE:
                self.metrics.jobs_finished.labels(JobState.DONE).inc()
                self.metrics.stage_seconds.labels("dispatch").observe(seconds)
            return True
        attempts = current.attempts + 1
        first = current.first_attempt_at or time.time()
        d = self.cfg.dispatch
        delay = backoff_delay(attempts, d.backoff_initial_seconds, d.backoff_max_seconds, self._rng)
        dead = (time.time() + delay - first) > d.give_up_after_seconds or dest is None
        state = self.journal.record_attempt(job.id, delivery.destination, ok=False, error=error,
                                            next_attempt_at=time.time() + delay, dead=dead)
        if dead:
            log.error("job %d: delivery to %s dead-lettered after %d attempts: %s", job.id,
                      delivery.destination, attempts, error)
        else:
            log.warning("job %d: delivery to %s failed (attempt %d, next in %.0f s): %s", job.id,
                        delivery.destination, attempts, delay, error)
        self._count(delivery.destination, "dead_letter" if dead else "failed")
        if self.metrics and state == JobState.DEAD_LETTER:
            self.metrics.jobs_finished.labels(JobState.DEAD_LETTER).inc()
        return False

    def _send(self, job_id: int, dest: DestinationConfig, folder: Path, sent: list[int]) -> tuple[str | None, bool]:
        """Send the job's results that `dest` has not acknowledged. Returns (the error, or None when
        the destination has them all; whether the destination was reached)."""
        try:
            files = collect_files([folder])
        except FileNotFoundError:
            return f"output folder missing: {folder}", True
        if not files:
            return f"no files to send in {folder}", True
        acknowledged = self.journal.delivered_instances(job_id, dest.name)
        todo = [f for f in files if f.stem not in acknowledged]
        sent[0] = len(files) - len(todo)
        if not todo:
            return None, True

        def progress(path: Path, stored: bool) -> None:
            if stored:  # committed before the next instance goes out
                self.journal.record_instance_delivered(job_id, dest.name, path.stem)
                sent[1] += 1

        try:
            if dest.dicomweb:
                report = stow_files(todo, dest, on_progress=progress)
            else:
                tls = client_tls_context(dest.ca_file) if dest.tls else None
                calling = self.cfg.dispatch.calling_ae_title or self.cfg.node.ae_title
                assert dest.ae_title is not None and dest.host is not None  # the config checks it
                report = store_files(todo, dest.host, dest.port, dest.ae_title, calling, timeout=timeouts(dest),
                                     tls=tls, on_progress=progress)
        except (AssociationFailed, StowUnreachable, OSError) as exc:
            return f"{exc} ({sent[0] + sent[1]} of {len(files)} instances acknowledged)", False
        except StowRefused as exc:
            return f"{exc} ({sent[0] + sent[1]} of {len(files)} instances acknowledged)", True
        if not report.ok:
            path, why = report.failed[0]
            return f"{len(report.failed)} of {len(files)} instances not stored (first: {Path(path).name}: {why})", True
        return None, True

    def _count(self, destination: str, result: str) -> None:
        if self.metrics:
            self.metrics.deliveries.labels(destination, result).inc()
