"""`dicomnode audit`: the journal's events as a trail a PACS administrator can read."""

from __future__ import annotations

import json

import pytest
from pydicom import dcmread
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.config import config_from_dict
from dicomnode.journal import JobState
from dicomnode.node import Node
from tests.support.dicomfactory import make_series
from tests.support.doubles import CopyProcessor
from tests.support.nodehelpers import make_raw_config, wait_for, write_toml
from tests.support.peers import dcmtk, run

pytestmark = pytest.mark.integration


def test_audit_trail_of_a_processed_series(tmp_path, port):
    raw = make_raw_config(tmp_path, port, series={"quiet_seconds": 1.0, "settle_seconds": 0.1}, rules={"min_slices": 3},
                          logging={"audit_file": str(tmp_path / "audit.jsonl")})
    toml = write_toml(tmp_path / "node.toml", raw)
    files = make_series(tmp_path / "in", slices=4, patient_name="AUDIT^PATIENT")
    other = make_series(tmp_path / "other", slices=4, description="t1_tse_sag")
    uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    with Node(config_from_dict(raw), CopyProcessor()) as node:
        run([dcmtk("storescu"), "-aec", "DICOMNODE", "127.0.0.1", str(port), *map(str, files + other)])
        assert wait_for(lambda: len(node.journal.jobs([JobState.DONE, JobState.IGNORED])) == 2, 20)
    runner = CliRunner()
    r = runner.invoke(app, ["audit", "--config", str(toml)])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("time") and "AUDIT" not in r.output and "PID0001" not in r.output
    for kind in ("received", "complete", "selected", "processing", "encoded", "done", "ignored"):
        assert f" {kind} " in r.output, kind
    assert "4 images by test-copy in " in r.output and "excluded by 't1'" in r.output
    assert "4 instances from ECHOSCU" in r.output or "4 instances from STORESCU" in r.output
    r = runner.invoke(app, ["audit", "--config", str(toml), "--series", uid, "--since", "1h", "--json"])
    rows = [json.loads(line) for line in r.output.splitlines()]
    assert rows and {row["series_uid"] for row in rows} == {uid}
    assert [row["kind"] for row in rows] == ["received", "complete", "selected", "processing", "encoded", "done"]
    lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [x["event"] for x in lines if x["series_uid"] == uid] == [row["kind"] for row in rows]
    assert "AUDIT" not in (tmp_path / "audit.jsonl").read_text()
    r = runner.invoke(app, ["audit", "--config", str(toml), "--since", "yesterday"])
    assert r.exit_code == 2 and "--since" in r.output
