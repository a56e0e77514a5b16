"""The deploy/ files: the Grafana dashboard must query metrics the node really exposes.

A misspelt metric or label in a panel shows "No data" forever instead of failing, so the
dashboard is checked against the exposition of a real Metrics registry.
"""

import json
import re
import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dicomnode.journal import Instance, Journal
from dicomnode.metrics import Metrics
from dicomnode.spool import Spool

GRAFANA = Path(__file__).parent.parent / "deploy" / "grafana"
DASHBOARD = json.loads((GRAFANA / "dicomnode.json").read_text())
PANELS = DASHBOARD["panels"]
EXPRS = [t["expr"] for p in PANELS for t in p.get("targets", [])]


def test_dashboard_panels_are_well_formed():
    ids = [p["id"] for p in PANELS]
    assert len(ids) == len(set(ids))
    assert all({"x", "y", "w", "h"} <= p["gridPos"].keys() for p in PANELS)
    assert all(t.get("expr") for p in PANELS for t in p["targets"])
    assert all('instance=~"$instance"' in e for e in EXPRS)
    assert DASHBOARD["uid"] == "dicomnode"


@pytest.fixture
def exposition(tmp_path) -> dict[str, set[str]]:
    """Sample name -> label names, from a registry in which every metric has a sample."""
    journal = Journal(tmp_path / "j.sqlite")
    job_id, _ = journal.record_instance(Instance("1.1", "1.2.3", "1.2", "1.2.840.10008.5.1.4.1.1.4",
                                                 "1.2.840.10008.1.2.1", "/x/1.1.dcm", 10, "SCU", time.time(),
                                                 1, None, None))
    for s in ("complete", "selected", "processing", "encoded"):
        journal.transition(job_id, s)
    journal.start_deliveries(job_id, ["pacs"])  # a pending delivery for dicomnode_deliveries
    m = Metrics(journal, Spool(tmp_path / "spool"))
    m.observe_store(0, 0.01)
    m.associations_rejected.inc()
    m.dicomweb_requests.labels("200").inc()
    m.series_completed.labels("quiet").inc()
    m.series_selected.labels("true").inc()
    m.stage_seconds.labels("infer").observe(1.0)
    m.deliveries.labels("pacs", "success").inc()
    m.destination_reachable.labels("pacs").set(1)
    m.jobs_finished.labels("done").inc()
    m.observe_safety({"input_score": 1.5, "input_flagged": 1.0})
    m.up.set(1)
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(generate_latest(m.registry).decode()):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def test_dashboard_queries_only_exposed_metrics_and_labels(exposition):
    variables = [v["definition"] for v in DASHBOARD["templating"]["list"] if v.get("definition")]
    names = {n for e in EXPRS + variables for n in re.findall(r"dicomnode_[a-z_]+", e)}
    assert names and names <= exposition.keys(), names - exposition.keys()
    for e in EXPRS:
        if "histogram_quantile" in e:
            assert re.search(r"dicomnode_[a-z_]+_bucket\b", e), e
    labels = set().union(*exposition.values()) | {"instance", "job"}  # the last two come from the scrape
    used = {x.strip() for e in EXPRS for group in re.findall(r"by \(([^)]*)\)", e) for x in group.split(",")}
    assert used <= labels, used - labels


def test_provisioning_files_parse():
    ds = (GRAFANA / "provisioning" / "datasources" / "dicomnode.yml").read_text()
    dash = (GRAFANA / "provisioning" / "dashboards" / "dicomnode.yml").read_text()
    try:
        import yaml
    except ImportError:  # PyYAML is not a dependency; fall back to the lines that matter
        assert "url: http://127.0.0.1:9090" in ds and "type: prometheus" in ds
        assert "path: /var/lib/grafana/dashboards/dicomnode" in dash
        return
    ds, dash = yaml.safe_load(ds), yaml.safe_load(dash)
    assert ds["datasources"][0]["type"] == "prometheus"
    assert ds["datasources"][0]["url"] == "http://127.0.0.1:9090"
    assert dash["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards/dicomnode"
