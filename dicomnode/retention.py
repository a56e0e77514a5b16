"""Retention: remove the files of finished series after `[retention] keep_hours`.

Only jobs that are done, ignored or failed are eligible, and a series' received files are kept
while any job of that series is still active; undelivered results (sending, dead letter) are
never removed.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from dicomnode.config import RetentionConfig
from dicomnode.journal import ACTIVE_STATES, Job, JobState, Journal
from dicomnode.spool import Spool

log = logging.getLogger("dicomnode.retention")

EXPIRES = (JobState.DONE, JobState.IGNORED, JobState.FAILED)  # states whose files expire after keep_hours


def purge_refused(job: Job, force: bool = False) -> str | None:
    """Why an operator's purge leaves `job` alone (None: it may go). A job still being worked on,
    or whose results are undelivered, goes only with `force`."""
    if force or (job.state not in ACTIVE_STATES and job.state != JobState.DEAD_LETTER):
        return None
    return f"job {job.id} is {job.state}: not purged (use --force)"


def remove_job_files(journal: Journal, spool: Spool, job: Job) -> None:
    """Remove a finished job's outputs and, unless another job of its series is still active,
    the series' received files and instance rows. Holds the series lock, so an instance that
    arrives meanwhile is either removed before it is stored or stored after the removal; the
    spool's removal lock does the same against a node in another process (`queue purge`)."""
    if job.output_dir:
        spool.remove_tree(Path(job.output_dir))
    with journal.series_lock(job.series_uid), spool.removing():
        if not journal.series_has_active_job(job.series_uid):
            spool.remove_tree(spool.series_dir(job.study_uid, job.series_uid))
            journal.forget_series_instances(job.series_uid)


def sweep(cfg: RetentionConfig, journal: Journal, spool: Spool, now: float | None = None) -> int:
    """Remove expired files; return the number of jobs whose files were removed."""
    cutoff = (time.time() if now is None else now) - cfg.keep_hours * 3600
    removed = 0
    for job in journal.unpurged_jobs(EXPIRES, updated_before=cutoff):
        try:
            remove_job_files(journal, spool, job)
            journal.mark_purged(job.id)
            removed += 1
        except Exception:  # one bad job must not stop the clean-up of the others
            log.exception("retention: cannot remove the files of job %d", job.id)
    if removed:
        log.info("retention: removed the files of %d finished job(s)", removed)
    return removed


def start_scheduler(cfg: RetentionConfig, journal: Journal, spool: Spool):
    """An apscheduler background job that sweeps every `check_interval_minutes`."""
    from datetime import datetime

    from apscheduler.schedulers.background import BackgroundScheduler

    scheduler = BackgroundScheduler(daemon=True)
    scheduler.add_job(sweep, "interval", args=(cfg, journal, spool), minutes=cfg.check_interval_minutes,
                      id="retention", max_instances=1, coalesce=True, next_run_time=datetime.now())
    scheduler.start()
    return scheduler
