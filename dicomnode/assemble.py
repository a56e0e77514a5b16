"""Series assembly: decide when a series is complete.

A series is complete when it has been quiet for `[series] quiet_seconds`, or earlier,
`settle_seconds` (<= 1 s) after its last instance, when it declares its size and all of it is
here (see Journal.declared_size_met). Deadlines are computed from times stored in the journal,
so after a restart pending series resume and complete on the same schedule.
"""

from __future__ import annotations

import logging
import time

from dicomnode.config import SeriesConfig
from dicomnode.journal import JobState, Journal

log = logging.getLogger("dicomnode.assemble")


class Assembler:
    """Completes series. The quiet period never counts time the node was down: it runs from the
    later of the last instance and `started_at`, so a sender that was cut off by a crash or a
    restart has a full quiet period to resume before a partial series is taken as complete."""

    def __init__(self, cfg: SeriesConfig, journal: Journal, metrics=None, started_at: float | None = None):
        self.cfg = cfg
        self.journal = journal
        self.metrics = metrics
        self.started_at = time.time() if started_at is None else started_at

    def due(self, now: float | None = None) -> list[tuple[int, str]]:
        """Jobs whose series is complete now, with how ('declared' or 'quiet')."""
        now = time.time() if now is None else now
        out = []
        for job in self.journal.jobs([JobState.RECEIVED]):
            quiet_for = now - max(job.last_instance_at, self.started_at)
            if quiet_for >= self.cfg.quiet_seconds:
                out.append((job.id, "quiet"))
            elif quiet_for >= self.cfg.settle_seconds and self.journal.declared_size_met(job.series_uid):
                out.append((job.id, "declared"))
        return out

    def complete_due(self, now: float | None = None) -> list[int]:
        """Mark every due series complete; `now` (default: the wall clock) makes tests deterministic."""
        now = time.time() if now is None else now
        done = []
        for job_id, how in self.due(now):
            instances = self.journal.instances(self.journal.job(job_id).series_uid)
            callers = ", ".join(sorted({i.calling_aet or "?" for i in instances}))
            self.journal.transition(job_id, JobState.COMPLETE, expect=JobState.RECEIVED, completed_at=now,
                                    completion=how, note=f"{len(instances)} instances from {callers} ({how})")
            log.info("job %d: series complete (%s)", job_id, how)
            if self.metrics:
                self.metrics.series_completed.labels(how).inc()
            done.append(job_id)
        return done
