"""Prometheus metrics. One registry per node, so tests can run several nodes in one process.

Job-state and delivery gauges are read from the journal at scrape time (state lives in the
journal, not in counters that a restart would reset).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from dicomnode.journal import DeliveryState

if TYPE_CHECKING:
    from dicomnode.journal import Journal
    from dicomnode.spool import Spool

STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
SCORE_BUCKETS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.25, 1.5, 2, 3, 5, 10)


class _JournalCollector:
    def __init__(self, journal: "Journal", spool: "Spool"):
        self.journal = journal
        self.spool = spool

    def collect(self):
        jobs = GaugeMetricFamily("dicomnode_jobs", "Jobs in the journal by state", labels=["state"])
        for state, n in self.journal.state_counts().items():
            jobs.add_metric([state], n)
        yield jobs
        pending = GaugeMetricFamily("dicomnode_deliveries", "Deliveries by destination and state",
                                    labels=["destination", "state"])
        counts: dict[tuple[str, str], int] = {}
        for d in self.journal.deliveries(states=(DeliveryState.PENDING, DeliveryState.DEAD_LETTER)):
            counts[(d.destination, d.state)] = counts.get((d.destination, d.state), 0) + 1
        for (dest, state), n in counts.items():
            pending.add_metric([dest, state], n)
        yield pending
        yield GaugeMetricFamily("dicomnode_spool_free_bytes", "Free bytes on the spool's file system",
                                value=self.spool.free_mb() * 2**20)


class Metrics:
    def __init__(self, journal: "Journal | None" = None, spool: "Spool | None" = None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.instances = Counter("dicomnode_instances_received", "Instances received (C-STORE and STOW-RS) by result",
                                 ["result"], registry=r)
        self.store_seconds = Histogram("dicomnode_store_seconds", "Time to store one instance durably",
                                       registry=r, buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5))
        self.dicomweb_requests = Counter("dicomnode_dicomweb_requests", "STOW-RS requests by HTTP status", ["code"],
                                         registry=r)
        self.associations_rejected = Counter("dicomnode_associations_rejected", "Associations rejected", registry=r)
        self.series_completed = Counter("dicomnode_series_completed", "Series completed, by how", ["how"], registry=r)
        self.series_selected = Counter("dicomnode_series_selected", "Series selection outcome", ["matched"], registry=r)
        self.jobs_finished = Counter("dicomnode_jobs_finished", "Jobs that reached a terminal state", ["state"],
                                     registry=r)
        self.stage_seconds = Histogram("dicomnode_stage_seconds", "Time per pipeline stage", ["stage"], registry=r,
                                       buckets=STAGE_BUCKETS)
        self.deliveries = Counter("dicomnode_delivery_attempts", "Delivery attempts", ["destination", "result"],
                                  registry=r)
        self.inference_restarts = Counter("dicomnode_inference_restarts", "Inference process restarts, by reason "
                                          "(crash: it died; timeout: the watchdog killed it)", ["reason"], registry=r)
        self.destination_reachable = Gauge("dicomnode_destination_reachable", "0 while dispatch holds a destination "
                                           "it could not reach (its deliveries wait), else 1", ["destination"],
                                           registry=r)
        self.input_score = Histogram("dicomnode_input_score", "The safety gate's input score per series (above 1: "
                                     "outside the model's training data)", registry=r, buckets=SCORE_BUCKETS)
        self.safety = Counter("dicomnode_safety_series", "Series the safety gate flagged or refused, by check "
                              "(input, output) and action (flagged, refused)", ["check", "action"], registry=r)
        self.up = Gauge("dicomnode_up", "1 while the node is serving", registry=r)
        if journal is not None and spool is not None:
            r.register(_JournalCollector(journal, spool))

    def observe_store(self, status: int, seconds: float) -> None:
        result = "success" if status == 0 else f"0x{status:04X}"
        self.instances.labels(result).inc()
        self.store_seconds.observe(seconds)

    def observe_safety(self, metrics: dict[str, float]) -> None:
        """A job's safety outcome (its `input_score`, `input_flagged`, `output_refused`, ...)."""
        if "input_score" in metrics:
            self.input_score.observe(metrics["input_score"])
        for check in ("input", "output"):
            for action in ("flagged", "refused"):
                if metrics.get(f"{check}_{action}"):
                    self.safety.labels(check, action).inc()
