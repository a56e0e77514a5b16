"""A site's road end to end, on the CPU, with the commands the guide gives
(docs/user-guide/research/site-data.md): phantom PET/MR studies (scanner-like PET) in a real
Orthanc -> `retrieve` -> `build-dataset --from raw-pet` -> `finetune` a few steps from the shipped
model -> `compare` against the shipped model -> `dicomnode serve` with the new model synthesises a
series sent by the scanner and stores it back into Orthanc."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from dicomnode.infer.model import read_card
from dicomnode.modelpath import resolve_model
from dicomnode.tools.phantom import generate, write_case
from tests.support.nodehelpers import make_raw_config, write_toml
from tests.support.orthanc import ORTHANC, OrthancServer
from tests.support.peers import dcmtk, free_port, run, wait_for_node

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(not Path(ORTHANC).exists(), reason="Orthanc not installed (apt-get install orthanc)")]

AET = "DICOMNODE-RT"


def training(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "training", *args], capture_output=True, text=True, timeout=timeout,
                       cwd=Path(__file__).resolve().parents[1])
    assert "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    return r


def test_from_the_pacs_to_a_fine_tuned_model_in_service(tmp_path, port):
    shipped = resolve_model("default")
    t0 = time.perf_counter()
    src = tmp_path / "src"
    cases = generate(src, 5, seed=51, min_matrix=64, max_matrix=64, min_slices=8, max_slices=8)
    research = {"AET": AET, "Host": "127.0.0.1", "Port": free_port(), "AllowFind": True, "AllowGet": True,
                "AllowStore": False, "AllowEcho": True, "AllowMove": False}
    node = {"AET": "DICOMNODE", "Host": "127.0.0.1", "Port": port, "AllowStore": True, "AllowEcho": True,
            "AllowFind": False, "AllowGet": False, "AllowMove": False}
    orthanc = OrthancServer(tmp_path, {"DicomModalities": {"research": research, "dicomnode": node}})
    serve = None
    try:
        for c in cases:
            for key in ("mr", "pet"):
                for p in c[key]:
                    orthanc.post_instance((src / p).read_bytes())
        rows = tmp_path / "exams.csv"
        rows.write_text("accession_number\n" + "".join(
            f"{pydicom.dcmread(src / c['mr'][0], stop_before_pixels=True).AccessionNumber}\n" for c in cases))
        export, data, site = tmp_path / "export", tmp_path / "data", tmp_path / "site"
        r = training("retrieve", "--csv", str(rows), "--out", str(export), "--host", "127.0.0.1",
                     "--port", str(orthanc.dicom_port), "--called-aet", "PACS", "--calling-aet", AET)
        assert r.returncode == 0, r.stdout + r.stderr
        r = training("build-dataset", "--export", str(export), "--out", str(data), "--from", "raw-pet",
                     "--site-key", str(tmp_path / "site.key"))
        assert r.returncode == 0 and "40 pairs from 5 studies" in r.stdout, r.stdout + r.stderr
        r = training("finetune", "--init", str(shipped), "--data", str(data), "--out", str(site),
                     "--pix2pix-steps", "2", "--cddpm-steps", "2", "--threads", "2")
        assert r.returncode == 0, r.stdout + r.stderr
        r = training("compare", "--data", str(data), "--split", "test", "--model", str(shipped),
                     "--model", str(site / "model"), "--out", str(tmp_path / "compare"), "--write-card",
                     "--draws", "500", "--threads", "2")
        assert r.returncode == 0, r.stdout + r.stderr
        report = json.loads((tmp_path / "compare" / "compare.json").read_text())
        card = read_card(site / "model")
        assert card["comparison"]["verdicts"] == [report["comparisons"][0]["verdict"]]
        assert card["provenance"]["starting_model"] == read_card(shipped)["version"]
        # The new model in service: the scanner sends a T2FS series, the result lands in Orthanc.
        raw = make_raw_config(
            tmp_path, port, series={"quiet_seconds": 1.0},
            inference={"model": str(site / "model"), "device": "cpu"},
            destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": orthanc.dicom_port}])
        serve = subprocess.Popen([sys.executable, "-m", "dicomnode.cli", "serve", "--config",
                                  str(write_toml(tmp_path / "node.toml", raw))],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for_node(serve, port)
        new = write_case(tmp_path / "scanner", 52, rows=64, slices=8)
        run([dcmtk("storescu"), "-aec", "DICOMNODE", "-aet", "SCANNER", "127.0.0.1", str(port), *new["mr"]])
        deadline = time.time() + 240
        while True:
            found = [s for s in orthanc.get("/series?expand") if s["MainDicomTags"].get("Modality") == "OT"
                     and s["ParentStudy"] and len(s["Instances"]) == 8]
            if found:
                break
            assert serve.poll() is None and time.time() < deadline, "no synthetic series in Orthanc"
            time.sleep(1)
        inst = orthanc.get(f"/instances/{found[0]['Instances'][0]}/simplified-tags")
        assert inst["StudyInstanceUID"] == new["study_uid"] and "SYNTHETIC" in inst["SeriesDescription"].upper()
    finally:
        if serve is not None:
            serve.terminate()
            serve.wait(30)
        orthanc.stop()
    print(f"site road end to end: {time.perf_counter() - t0:.0f} s")
