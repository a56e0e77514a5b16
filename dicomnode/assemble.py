"""Series assembly: decide when a series is complete.

A series is complete when it has been quiet for `[series] quiet_seconds`, or earlier,
`settle_seconds` (<= 1 s) after its last instance, when it declares its size and all of it is
here (`declared_size_met`). Deadlines are computed from times stored in the journal,
so after a restart pending series resume and complete on the same schedule.
"""

from __future__ import annotations

import logging
import time

from dicomnode.config import SeriesConfig
from dicomnode.journal import JobState, Journal

log = logging.getLogger("dicomnode.assemble")


def declared_size_met(extent: list[tuple[int | None, int | None, str | None]]) -> bool:
    """Whether a series says how big it is and all of it is here, from each instance's
    (Images in Acquisition, Number of Frames, Image Position (Patient)).

    A multi-frame instance (Number of Frames > 1) carries the whole series; otherwise Images in
    Acquisition (0020,1002), when every instance agrees on it, must equal the number of distinct
    positions received (or of instances, where positions are missing).
    """
    if not extent:
        return False
    if any((frames or 1) > 1 for _, frames, _ in extent):
        return True
    declared = {n for n, _, _ in extent}
    if len(declared) != 1 or None in declared:
        return False
    (n,) = declared
    positions = [p for _, _, p in extent]
    have = len(set(positions)) if all(positions) else len(extent)
    return n is not None and n > 0 and have >= n


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
            elif quiet_for >= self.cfg.settle_seconds and declared_size_met(self.journal.series_extent(job.series_uid)):
                out.append((job.id, "declared"))
        return out

    def complete_due(self, now: float | None = None) -> list[int]:
        """Mark every due series complete; `now` (default: the wall clock) makes tests deterministic."""
        now = time.time() if now is None else now
        done = []
        for job_id, how in self.due(now):
            job = self.journal.job(job_id)
            if job is None:  # purged meanwhile
                continue
            instances = self.journal.instances(job.series_uid)
            callers = ", ".join(sorted({i.calling_aet or "?" for i in instances}))
            self.journal.transition(job_id, JobState.COMPLETE, expect=JobState.RECEIVED, completed_at=now,
                                    completion=how, note=f"{len(instances)} instances from {callers} ({how})")
            log.info("job %d: series complete (%s)", job_id, how)
            if self.metrics:
                self.metrics.series_completed.labels(how).inc()
            done.append(job_id)
        return done
