"""`python -m training retrieve` against a real Orthanc holding phantom PET/MR studies: C-FIND,
the node's rules on a probe image, C-GET of the T2FS and PT series, resume, and a report per row
(found, not found, refused, timed out, incomplete); then pairs from what it fetched."""

from __future__ import annotations

import csv
import socket
import threading
from pathlib import Path

import pydicom
import pytest

from dicomnode.tools.phantom import generate, write_case
from tests.support.orthanc import ORTHANC, OrthancServer
from tests.support.peers import free_port
from training.__main__ import main as training_main
from training.data import build_dataset
from training.retrieve import MARKER, REPORT

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not Path(ORTHANC).exists(), reason="Orthanc not installed (apt-get install orthanc)")]

AET = "RESEARCH-RT"
SMALL = dict(min_matrix=64, max_matrix=80, min_slices=8, max_slices=8)


def _orthanc(tmp_path: Path) -> OrthancServer:
    modality = {"AET": AET, "Host": "127.0.0.1", "Port": free_port(), "AllowFind": True, "AllowGet": True,
                "AllowEcho": True, "AllowStore": False, "AllowMove": False}
    return OrthancServer(tmp_path, {"DicomModalities": {"research": modality}})


def _report(export: Path) -> list[dict]:
    with open(export / REPORT, newline="") as fh:
        return list(csv.DictReader(fh))


def _series_files(export: Path) -> dict[str, int]:
    return {d.name: len(list(d.glob("*.dcm"))) for d in export.glob("*/*") if d.is_dir() and d.name != ".probe"}


def test_retrieve_fetches_t2fs_and_pt_resumes_and_reports_each_row(tmp_path):
    src = tmp_path / "src"
    cases = generate(src, 3, seed=31, **SMALL)
    # A T1 series filed in the first study: the node's rules must leave it in the PACS.
    t1 = write_case(tmp_path / "t1", 32, weighting="T1", rows=64, slices=8)
    first_mr = pydicom.dcmread(src / cases[0]["mr"][0])
    # ... and a study without PET.
    lonely = write_case(tmp_path / "lonely", 33, rows=64, slices=8)
    orthanc = _orthanc(tmp_path)
    try:
        files = [src / p for c in cases for key in ("mr", "pet", "fusion") for p in c[key]]
        for path in files:
            orthanc.post_instance(path.read_bytes())
        for p in t1["mr"]:
            ds = pydicom.dcmread(p)
            for key in ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber", "StudyDate",
                        "PatientBirthDate", "FrameOfReferenceUID"):
                setattr(ds, key, getattr(first_mr, key))
            ds.save_as(p, enforce_file_format=True)
            orthanc.post_instance(Path(p).read_bytes())
        for p in lonely["mr"]:
            orthanc.post_instance(Path(p).read_bytes())
        lonely_mr = pydicom.dcmread(lonely["mr"][0])
        rows = tmp_path / "rows.csv"
        c1 = pydicom.dcmread(src / cases[1]["mr"][0])
        rows.write_text("accession_number,patient_id,study_date\n"
                        f"{first_mr.AccessionNumber},,\n"
                        f",{c1.PatientID},{c1.StudyDate}\n"
                        "NOSUCHACC,,\n"
                        f"{lonely_mr.AccessionNumber},,\n"
                        f"{pydicom.dcmread(src / cases[2]['mr'][0]).AccessionNumber},,\n")
        export = tmp_path / "export"
        argv = ["retrieve", "--csv", str(rows), "--out", str(export), "--host", "127.0.0.1",
                "--port", str(orthanc.dicom_port), "--called-aet", "PACS", "--calling-aet", AET, "--workers", "2"]
        assert training_main(argv) == 1  # not every row was found
        report = _report(export)
        assert [r["status"] for r in report] == ["found", "found", "not found", "incomplete", "found"]
        assert "no PT series" in report[3]["reason"]
        got = _series_files(export)
        for c in cases:
            assert got[c["mr_series_uid"]] == len(c["mr"]) and got[c["pet_series_uid"]] == len(c["pet"])
            assert c["fusion_series_uid"] not in got  # only T2FS and PT are fetched
            assert (export / c["study_uid"] / c["pet_series_uid"] / MARKER).exists()
        assert t1["mr_series_uid"] not in got
        assert int(report[0]["series_fetched"]) == 2 and int(report[0]["instances"]) == len(cases[0]["mr"]) + len(cases[0]["pet"])
        # Resume: nothing is fetched twice.
        (export / REPORT).unlink()
        assert training_main(argv) == 1
        again = _report(export)
        assert [r["status"] for r in again] == [r["status"] for r in report]
        assert all(r["series_fetched"] == "0" and r["instances"] == "0" for r in again if r["status"] == "found")
        assert sum(int(r["series_already_here"]) for r in again) == 2 * len(cases) + 1
        # A wrong called AE title is refused at association.
        wrong = tmp_path / "wrong"
        bad = [*argv[:4], str(wrong), *argv[5:]]
        bad[bad.index("PACS")] = "NOTPACS"
        assert training_main(bad) == 1
        assert {r["status"] for r in _report(wrong)} == {"refused"}
        # What was fetched pairs from the raw PET.
        m = build_dataset(export, tmp_path / "data", source="raw-pet", site_key=tmp_path / "key")
        assert m["counts"]["studies"] == 3 and m["counts"]["pairs"] == sum(c["slices"] for c in cases)
        assert [s["reason"] for s in m["skipped"]] == ["no PT series in study"]
    finally:
        orthanc.stop()


def test_a_silent_peer_is_timed_out_and_a_bad_csv_is_a_clear_error(tmp_path, capsys):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:  # accept and say nothing
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        rows = tmp_path / "rows.csv"
        rows.write_text("accession_number\nA1\n")
        out = tmp_path / "export"
        assert training_main(["retrieve", "--csv", str(rows), "--out", str(out), "--host", "127.0.0.1",
                              "--port", str(server.getsockname()[1]), "--called-aet", "PACS", "--timeout", "2"]) == 1
        assert [r["status"] for r in _report(out)] == ["timed out"]
    finally:
        stop.set()
        t.join()
        for s in held:
            s.close()
        server.close()
    rows.write_text("patient_id,study_date\nX,2020-01-01\n")
    assert training_main(["retrieve", "--csv", str(rows), "--out", str(out), "--host", "127.0.0.1", "--port", "1",
                          "--called-aet", "PACS"]) == 2
    assert "line 2" in capsys.readouterr().err
