"""Dispatch: deliver a job's encoded files to every configured destination.

Each destination has its own delivery row in the journal. A failed attempt is retried with
capped exponential backoff and jitter; once the next attempt would fall past
`give_up_after_seconds` from the first, the delivery goes to the dead letter (re-driven by
`dicomnode queue retry`). Dispatch knows nothing about images: it sends files.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

from dicomnode.config import Config, DestinationConfig
from dicomnode.journal import Delivery, Journal
from dicomnode.scu import AssociationFailed, client_tls_context, collect_files, store_files

log = logging.getLogger("dicomnode.dispatch")


def backoff_delay(attempts: int, initial: float, cap: float, rng: random.Random | None = None) -> float:
    """Delay before attempt `attempts + 1`: initial * 2^(attempts-1), capped, with 50-100% jitter."""
    base = min(cap, initial * 2 ** max(0, attempts - 1))
    return base * (0.5 + 0.5 * (rng or random).random())


class Dispatcher:
    def __init__(self, cfg: Config, journal: Journal, metrics=None):
        self.cfg = cfg
        self.journal = journal
        self.metrics = metrics
        self.destinations = {d.name: d for d in cfg.destinations}
        self._rng = random.Random()

    def run_due(self, now: float | None = None) -> int:
        """Attempt every delivery that is due; return how many were attempted."""
        attempted = 0
        for delivery in self.journal.due_deliveries(time.time() if now is None else now):
            attempted += self.attempt(delivery) is not None
        return attempted

    def attempt(self, delivery: Delivery) -> bool | None:
        """One delivery attempt: True delivered, False failed; None when the job is not sending."""
        job = self.journal.job(delivery.job_id)
        dest = self.destinations.get(delivery.destination)
        if job is None or job.state != "sending":
            return None
        started = time.perf_counter()
        if dest is None:
            error = f"destination {delivery.destination!r} is no longer configured"
        else:
            try:
                error = self._send(dest, Path(job.output_dir or ""))
            except Exception as exc:  # any failure takes the backoff / dead-letter path
                error = f"{type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - started
        if error is None:
            state = self.journal.record_attempt(job.id, delivery.destination, ok=True)
            log.info("job %d: delivered to %s in %.2f s", job.id, delivery.destination, seconds)
            self._count(delivery.destination, "delivered")
            if self.metrics and state == "done":
                self.metrics.jobs_finished.labels("done").inc()
                self.metrics.stage_seconds.labels("dispatch").observe(seconds)
            return True
        attempts = delivery.attempts + 1
        first = delivery.first_attempt_at or time.time()
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
        if self.metrics and state == "dead_letter":
            self.metrics.jobs_finished.labels("dead_letter").inc()
        return False

    def _send(self, dest: DestinationConfig, folder: Path) -> str | None:
        try:
            files = collect_files([folder])
        except FileNotFoundError:
            return f"output folder missing: {folder}"
        if not files:
            return f"no files to send in {folder}"
        tls = client_tls_context(dest.ca_file) if dest.tls else None
        calling = self.cfg.dispatch.calling_ae_title or self.cfg.node.ae_title
        try:
            report = store_files(files, dest.host, dest.port, dest.ae_title, calling,
                                 timeout=self.cfg.dispatch.timeout_seconds, tls=tls)
        except (AssociationFailed, OSError) as exc:
            return str(exc)
        if not report.ok:
            path, why = report.failed[0]
            return f"{len(report.failed)} of {len(files)} instances not stored (first: {Path(path).name}: {why})"
        return None

    def _count(self, destination: str, result: str) -> None:
        if self.metrics:
            self.metrics.deliveries.labels(destination, result).inc()
