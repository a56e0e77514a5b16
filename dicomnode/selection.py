"""The select stage: a complete series becomes 'selected' or 'ignored' by the rules, with the reason.

It reads the series' headers from the spool, evaluates `dicomnode.rules` on the whole series and
records the decision as a job state transition.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from dicomnode.config import RulesConfig
from dicomnode.journal import Job, JobState, Journal
from dicomnode.rules import Decision, evaluate, read_headers

log = logging.getLogger("dicomnode.select")


class Selector:
    """Evaluates the rules on a complete series and records 'selected' or 'ignored' with the reason."""

    def __init__(self, rules: RulesConfig, journal: Journal, metrics=None):
        self.rules = rules
        self.journal = journal
        self.metrics = metrics

    def select(self, job: Job) -> Decision:
        started = time.perf_counter()
        paths = [Path(i.path) for i in self.journal.instances(job.series_uid)]
        groups, bad = read_headers(paths)
        headers = groups.get(job.series_uid, [])
        decision = evaluate(self.rules, job.series_uid, headers)
        if bad and decision.matched:
            decision.matched = False
            decision.reason = f"{len(bad)} unreadable instance(s), e.g. {bad[0][0].name}: {bad[0][1]}"
        timings = dict(job.timings, select=round(time.perf_counter() - started, 4))
        if decision.matched:
            self.journal.transition(job.id, JobState.SELECTED, expect=JobState.COMPLETE, rule=decision.rule,
                                    reason=decision.reason, timings=timings)
            log.info("job %d: selected (rule %s)", job.id, decision.rule)
        else:
            self.journal.transition(job.id, JobState.IGNORED, expect=JobState.COMPLETE, reason=decision.reason, timings=timings)
            failed = [c["check"] for c in decision.checks if not c["ok"]] or ["unreadable"]
            log.info("job %d: ignored (failed: %s)", job.id, ", ".join(dict.fromkeys(failed)))
        if self.metrics:
            self.metrics.series_selected.labels(str(decision.matched).lower()).inc()
            if not decision.matched:
                self.metrics.jobs_finished.labels(JobState.IGNORED).inc()
        return decision
