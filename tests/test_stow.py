"""DICOMweb destinations (STOW-RS) against a real Orthanc with its DICOMweb plugin: the synthetic
series is stored, QIDO-RS finds it, WADO-RS returns the node's pixel data byte for byte; a
destination with the wrong password is refused and retried, never stored; a destination that
is down is held and gets the series once it is up, each instance once."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import requests

from dicomnode.config import config_from_dict
from dicomnode.journal import Journal
from dicomnode.node import Node
from dicomnode.stow import _outcome
from tests.support.dicomfactory import make_series
from tests.support.doubles import CopyProcessor
from tests.support.nodehelpers import make_raw_config, wait_for, write_toml
from tests.support.orthanc import ORTHANC, OrthancServer
from tests.support.peers import dcmtk, free_port, run, wait_for_node
from tests.support.tinymodel import TINY_INFERENCE, make_tiny_model

DICOMWEB = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not (Path(ORTHANC).exists() and DICOMWEB.exists()),
                                 reason="Orthanc with its DICOMweb plugin (apt-get install orthanc orthanc-dicomweb)")]
USERS = {"dicomnode": "stow-secret-1"}


def dicomweb_orthanc(root: Path, http_port: int | None = None) -> OrthancServer:
    return OrthancServer(root, {"DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}, plugins=[str(DICOMWEB)],
                         users=USERS, http_port=http_port)


def secret(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def client(orthanc: OrthancServer):
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    session.auth = next(iter(USERS.items()))
    return DICOMwebClient(url=orthanc.url("/dicom-web"), session=session)


def test_synthetic_series_stored_with_stow_found_with_qido_and_retrieved_with_wado(tmp_path, port):
    orthanc = dicomweb_orthanc(tmp_path)
    web = {"name": "web", "url": orthanc.url("/dicom-web/"), "auth": "basic", "instances_per_request": 4,
           "credentials_file": str(secret(tmp_path / "web.secret", "dicomnode:stow-secret-1"))}
    wrong = {"name": "wrong-password", "url": orthanc.url("/dicom-web"), "auth": "basic",
             "credentials_file": str(secret(tmp_path / "wrong.secret", "dicomnode:not-the-password"))}
    raw = make_raw_config(tmp_path, port, series={"quiet_seconds": 1.0}, destinations=[web, wrong],
                          inference=dict(TINY_INFERENCE, model=str(make_tiny_model(tmp_path / "tiny")), device="cpu"))
    cfg = config_from_dict(raw)
    node = subprocess.Popen([sys.executable, "-m", "dicomnode.cli", "serve", "--config",
                             str(write_toml(tmp_path / "node.toml", raw))],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_node(node, port)
        files = make_series(tmp_path / "in", slices=9, rows=48, cols=40, patient_name="STOW^PATIENT")
        run([dcmtk("storescu"), "-aec", "DICOMNODE", "127.0.0.1", str(port), *map(str, files)])
        journal = Journal(cfg.journal_path)

        def state(name: str):
            return next((d for d in journal.deliveries() if d.destination == name), None)

        assert wait_for(lambda: (d := state("web")) is not None and d.state == "delivered", 120), \
            f"not delivered: {state('web')}\n{orthanc.log_text()[-2000:]}"
        assert wait_for(lambda: (d := state("wrong-password")) is not None and d.attempts >= 2, 30)
        refused = state("wrong-password")
        assert refused.state == "pending" and "HTTP 401" in (refused.last_error or "")
        (job,) = journal.jobs()
        outputs = {pydicom.dcmread(p).SOPInstanceUID: p for p in Path(job.output_dir).glob("*.dcm")}
        assert len(outputs) == len(files)

        dw = client(orthanc)
        study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
        series = [s for s in dw.search_for_series(search_filters={"StudyInstanceUID": study})]
        assert len(series) == 1  # only the synthetic series: the MR went to the node, not to Orthanc
        series_uid = pydicom.Dataset.from_json(series[0]).SeriesInstanceUID
        found = dw.search_for_instances(study, series_uid)
        assert {pydicom.Dataset.from_json(i).SOPInstanceUID for i in found} == set(outputs)
        for uid, path in outputs.items():
            back = dw.retrieve_instance(study, series_uid, uid)
            mine = pydicom.dcmread(path)
            assert back.PixelData == mine.PixelData
            assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and back.get("SyntheticData") == "YES"
        changes = orthanc.get("/changes?limit=1000")["Changes"]
        assert sum(c["ChangeType"] == "NewInstance" for c in changes) == len(files)  # each once
        journal.close()
    finally:
        node.send_signal(signal.SIGTERM)
        out, _ = node.communicate(timeout=60)
        orthanc.stop()
    assert node.returncode == 0, out
    assert "STOW" not in out and "stow-secret" not in out and "not-the-password" not in out  # no names, no secrets
    assert "delivery to wrong-password failed (attempt 1" in out and "HTTP 401" in out


def test_a_dicomweb_destination_that_is_down_is_held_then_gets_each_instance_once(tmp_path, port):
    http_port = free_port()
    raw = make_raw_config(tmp_path, port, series={"quiet_seconds": 1.0}, metrics={"enabled": False},
                          destinations=[{"name": "web", "url": f"http://127.0.0.1:{http_port}/dicom-web",
                                         "auth": "basic", "connect_timeout": 1.0,
                                         "credentials_file": str(secret(tmp_path / "s", "dicomnode:stow-secret-1"))}])
    with Node(config_from_dict(raw), CopyProcessor()) as node:
        files = make_series(tmp_path / "in", slices=8)
        run([dcmtk("storescu"), "-aec", "DICOMNODE", "127.0.0.1", str(port), *map(str, files)])
        assert wait_for(lambda: any(d.attempts >= 1 for d in node.journal.deliveries()), 30), node.journal.jobs()
        (d,) = node.journal.deliveries()
        assert d.state == "pending" and "ConnectionError" in (d.last_error or "")
        orthanc = dicomweb_orthanc(tmp_path, http_port=http_port)
        try:
            assert node.wait_idle(60)
            (d,) = node.journal.deliveries()
            assert d.state == "delivered", d
            changes = orthanc.get("/changes?limit=1000")["Changes"]
            assert sum(c["ChangeType"] == "NewInstance" for c in changes) == len(files)
        finally:
            orthanc.stop()


def test_stow_response_says_which_instances_were_stored():
    """The per-instance outcome as PS3.18 encodes it (Referenced and Failed SOP Sequences)."""
    body = {"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.3.1"]}},
                                              {"00081155": {"vr": "UI", "Value": ["1.2.3.2"]},
                                               "00081196": {"vr": "US", "Value": [0xB000]}}]},
            "00081198": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.3.3"]},
                                               "00081197": {"vr": "US", "Value": [0xA700]}}]}}
    stored, failed = _outcome(pydicom.Dataset.from_json(body))
    assert stored == {"1.2.3.1", "1.2.3.2"}  # a warning counts as stored
    assert failed == {"1.2.3.3": "failure reason 0xA700"}
    assert _outcome(pydicom.Dataset()) == (set(), {})
