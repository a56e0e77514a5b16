"""The shipped Orthanc routing (deploy/orthanc/) against a real Orthanc and a real `dicomnode serve`:
a series uploaded to Orthanc goes to dicomnode, and the synthetic series comes back into the same
study in Orthanc, once.

Orthanc 1.10 cannot bind to loopback only, so the test Orthanc listens on random ports with
remote HTTP access off and DICOM limited to the one known peer (dicomnode on 127.0.0.1, AE and
host checked): nothing else can store, echo or query it.
"""

from __future__ import annotations

import json
import re
import shutil
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
from tests.support.peers import free_port, wait_for_node
from tests.support.tinymodel import TINY_INFERENCE, make_tiny_model

pytestmark = pytest.mark.integration

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "orthanc"
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"


def _orthanc_json(path: Path) -> dict:
    """Orthanc's JSON with // comments (the only comment style the shipped file uses)."""
    return json.loads(re.sub(r"^\s*//.*$", "", path.read_text(), flags=re.M))


class OrthancServer:
    def __init__(self, root: Path, node_port: int, plugins: list[str] | None = None):
        self.http_port, self.dicom_port = free_port(), free_port()
        cfg = root / "orthanc-config"
        cfg.mkdir()
        routing = _orthanc_json(DEPLOY / "dicomnode.json")  # the shipped settings, pointed at this test
        routing["DicomModalities"]["dicomnode"][1:] = ["127.0.0.1", node_port]
        routing["LuaScripts"] = [str(DEPLOY / "dicomnode-route.lua")]
        routing["StableAge"] = 2  # seconds: the whole upload lands well within it
        (cfg / "dicomnode.json").write_text(json.dumps(routing))
        (cfg / "test.json").write_text(json.dumps({
            "Name": "dicomnode-test", "StorageDirectory": str(root / "orthanc-db"),
            "IndexDirectory": str(root / "orthanc-db"), "Plugins": plugins or [],
            "HttpPort": self.http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomAet": "PACS", "DicomPort": self.dicom_port, "DicomCheckCalledAet": True,
            "DicomAlwaysAllowEcho": False, "DicomAlwaysAllowStore": False, "DicomCheckModalityHost": True,
        }))
        self.log = open(root / "orthanc.log", "w")
        self.proc = subprocess.Popen([ORTHANC, str(cfg)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while True:
            try:
                self.get("/system")
                return
            except (urllib.error.URLError, ConnectionError):
                assert self.proc.poll() is None, f"Orthanc exited:\n{self.log_text()}"
                assert time.time() < deadline, "Orthanc did not come up"
                time.sleep(0.2)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def get(self, path: str):
        with urllib.request.urlopen(self.url(path), timeout=10) as r:
            return json.loads(r.read())

    def post_instance(self, data: bytes) -> dict:
        req = urllib.request.Request(self.url("/instances"), data=data, method="POST",
                                     headers={"Content-Type": "application/dicom"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def log_text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _metric(body: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", body, flags=re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.skipif(not Path(ORTHANC).exists(), reason="Orthanc not installed (apt-get install orthanc)")
def test_orthanc_routes_to_dicomnode_and_receives_the_synthetic_series(tmp_path, port):
    orthanc = OrthancServer(tmp_path, port)
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
