"""deploy/prometheus.yml, deploy/dicomnode-alerts.yml and the Grafana dashboard's queries against a
real Prometheus scraping a real `dicomnode serve`, and the alert rules under `promtool test rules`."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.support.dicomfactory import make_series
from tests.support.nodehelpers import make_raw_config, write_toml
from tests.support.peers import dcmtk, free_port, run, wait_for_node

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not (shutil.which("prometheus") and shutil.which("promtool")),
                                 reason="Prometheus not installed (apt-get install prometheus)")]

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def test_shipped_config_and_alert_rules_pass_promtool():
    run(["promtool", "check", "config", str(DEPLOY / "prometheus.yml")])
    proc = subprocess.run(["promtool", "test", "rules", "alerts_test.yml"], cwd=Path(__file__).parent / "prometheus",
                          capture_output=True, text=True, timeout=60)  # rule_files are relative to it
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _dashboard_queries() -> list[str]:
    dash = json.loads((DEPLOY / "grafana" / "dicomnode.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", []) if t.get("expr")]
    return [e.replace("$instance", ".*") for e in exprs]


def test_prometheus_scrapes_serve_evaluates_the_rules_and_runs_the_dashboard_queries(tmp_path, port):
    mport, pport = free_port(), free_port()
    raw = make_raw_config(tmp_path, port, metrics={"enabled": True, "host": "127.0.0.1", "port": mport},
                          inference={"model": "none"}, series={"quiet_seconds": 1.0})
    node = subprocess.Popen([sys.executable, "-m", "dicomnode.cli", "serve", "--config",
                             str(write_toml(tmp_path / "node.toml", raw))],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    conf = tmp_path / "prometheus"
    conf.mkdir()
    shutil.copy(DEPLOY / "dicomnode-alerts.yml", conf)
    text = (DEPLOY / "prometheus.yml").read_text()
    assert "127.0.0.1:9108" in text and "15s" in text
    (conf / "prometheus.yml").write_text(text.replace("127.0.0.1:9108", f"127.0.0.1:{mport}").replace("15s", "1s"))
    log = open(tmp_path / "prometheus.log", "w")
    prom = subprocess.Popen(["prometheus", f"--config.file={conf / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{pport}"],
                            stdout=log, stderr=subprocess.STDOUT)

    def api(path: str, **params):
        url = f"http://127.0.0.1:{pport}/api/v1/{path}?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())

    def value(query: str) -> float | None:
        try:
            result = api("query", query=query)["data"]["result"]
        except OSError:
            return None
        return float(result[0]["value"][1]) if result else None

    try:
        wait_for_node(node, port)
        files = make_series(tmp_path / "in", slices=9)
        run([dcmtk("storescu"), "-aec", "DICOMNODE", "127.0.0.1", str(port), *map(str, files)])

        deadline = time.time() + 60
        while value('dicomnode_instances_received_total{result="success"}') != len(files):
            assert prom.poll() is None, (tmp_path / "prometheus.log").read_text()
            assert time.time() < deadline, "Prometheus never scraped the received instances"
            time.sleep(0.5)
        assert value('dicomnode_up{job="dicomnode"}') == 1.0
        assert value('up{job="dicomnode"}') == 1.0
        assert value('dicomnode_spool_free_bytes') > 0

        for expr in _dashboard_queries():  # every panel's PromQL parses and runs in real Prometheus
            body = api("query", query=expr)
            assert body["status"] == "success", (expr, body)
        assert value('sum(dicomnode_jobs{state="selected"})') == 1.0  # model "none": the job waits

        deadline = time.time() + 30
        while True:  # the shipped rules load and evaluate without error; a healthy node fires none
            groups = api("rules")["data"]["groups"]
            rules = [r for g in groups for r in g["rules"]]
            if rules and all(r.get("lastEvaluation", "").startswith("2") for r in rules):  # not 0001-01-01
                break
            assert time.time() < deadline, rules
            time.sleep(0.5)
        assert {r["name"] for r in rules} == {"DicomnodeDown", "DicomnodeSpoolLow", "DicomnodeDeadLetter",
                                              "DicomnodeJobsFailed", "DicomnodeBacklog",
                                              "DicomnodeDestinationUnreachable", "DicomnodeInputDrift"}
        assert all(r["health"] == "ok" for r in rules), rules
        assert [r["name"] for r in rules if r["state"] != "inactive"] == []
    finally:
        prom.send_signal(signal.SIGTERM)
        node.send_signal(signal.SIGTERM)
        prom.wait(timeout=30)
        out, _ = node.communicate(timeout=30)
        log.close()
    assert node.returncode == 0, out
