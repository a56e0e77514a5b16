"""The shipped Orthanc routing (deploy/orthanc/) against a real Orthanc and a real `dicomnode serve`:
a series uploaded to Orthanc goes to dicomnode, and the synthetic series comes back into the same
study in Orthanc, once.

Orthanc 1.10 cannot bind to loopback only, so the test Orthanc listens on random ports with
remote HTTP access off and DICOM limited to the one known peer (dicomnode on 127.0.0.1, AE and
host checked): nothing else can store, echo or query it.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.dicomfactory import make_series
from tests.support.nodehelpers import make_raw_config, write_toml
from tests.support.orthanc import ORTHANC, routing_orthanc
from tests.support.peers import free_port, wait_for_node
from tests.support.tinymodel import TINY_INFERENCE, make_tiny_model

pytestmark = pytest.mark.integration



def _metric(body: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", body, flags=re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.skipif(not Path(ORTHANC).exists(), reason="Orthanc not installed (apt-get install orthanc)")
def test_orthanc_routes_to_dicomnode_and_receives_the_synthetic_series(tmp_path, port):
    orthanc = routing_orthanc(tmp_path, port)
    mport = free_port()
    raw = make_raw_config(
        tmp_path, port, series={"quiet_seconds": 1.0},
        node={"allowed_calling_aets": ["PACS"], "allowed_hosts": ["127.0.0.1"]},
        metrics={"enabled": True, "host": "127.0.0.1", "port": mport},
        inference=dict(TINY_INFERENCE, model=str(make_tiny_model(tmp_path / "tiny")), device="cpu"),
        destinations=[{"name": "orthanc", "ae_title": "PACS", "host": "127.0.0.1", "port": orthanc.dicom_port}])
    node = subprocess.Popen([sys.executable, "-m", "dicomnode.cli", "serve", "--config",
                             str(write_toml(tmp_path / "node.toml", raw))],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_node(node, port, calling_aet="PACS")  # Orthanc's send job does not retry
        files = make_series(tmp_path / "in", slices=9, rows=48, cols=40, patient_name="ROUTED^PATIENT")
        ids = [orthanc.post_instance(p.read_bytes())["ID"] for p in files]
        study = orthanc.get(f"/instances/{ids[0]}/study")["ID"]

        deadline, derived = time.time() + 120, None
        while derived is None:
            assert node.poll() is None, "dicomnode serve exited"
            assert time.time() < deadline, f"no synthetic series in Orthanc:\n{orthanc.log_text()[-3000:]}"
            for s in orthanc.get(f"/studies/{study}/series"):
                if s["MainDicomTags"].get("Modality") != "MR" and len(s["Instances"]) == len(files):
                    derived = s
            time.sleep(0.5)

        tags = orthanc.get(f"/instances/{derived['Instances'][0]}/tags?short")  # by tag number
        assert tags["0008,0016"] == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
        assert tags["0008,001c"] == "YES"  # Synthetic Data
        assert tags["0008,0008"].startswith("DERIVED")
        assert "SYNTHETIC" in tags["0008,103e"].upper()

        deadline = time.time() + 30  # once Orthanc calls the derived series stable, the script has seen it
        while not orthanc.get(f"/series/{derived['ID']}")["IsStable"]:
            assert time.time() < deadline, "the derived series never became stable in Orthanc"
            time.sleep(0.5)
        time.sleep(1.5)  # time for a (wrong) send back to dicomnode to arrive
        body = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
        assert _metric(body, 'dicomnode_instances_received_total{result="success"}') == len(files)
        assert len(orthanc.get(f"/studies/{study}/series")) == 2
        assert orthanc.log_text().count("dicomnode-route: queued series") == 1  # the MR series only
    finally:
        node.send_signal(signal.SIGTERM)
        out, _ = node.communicate(timeout=60)
        orthanc.stop()
    assert node.returncode == 0, out
    assert "ROUTED" not in out  # no patient names in dicomnode's log
