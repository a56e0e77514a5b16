"""A site's road on the phantom cohort: store it in a real Orthanc, `training retrieve` it
(C-FIND, probe, C-GET), side by side with DCMTK getscu fetching the same series, then
`build-dataset` from the raw PET and from the fusion SCs, and compare the two data sets.

    dicomnode phantom /tmp/c2027 --cases 40 --seed 2027
    python bench/bench_site_data.py /tmp/c2027 [--json out.json]

Orthanc listens on random ports with only this script's AE title allowed (as in the tests).
The peer, DCMTK getscu, runs once per series, one after the other; retrieve runs with --workers 1 (the
same one-at-a-time) and --workers 2. Times are wall-clock seconds of one run each.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicomnode.tools.imagemetrics import psnr, ssim  # noqa: E402
from tests.support.orthanc import OrthancServer  # noqa: E402
from tests.support.peers import dcmtk, free_port  # noqa: E402

AET = "RESEARCH-RT"


def _timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return round(time.perf_counter() - t0, 1)


def _pairs(data: Path) -> list[dict]:
    with open(data / "pairs.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cohort", type=Path, help="a `dicomnode phantom` export (with cases.json)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    cases = json.loads((a.cohort / "cases.json").read_text())["cases"]
    work = Path(tempfile.mkdtemp(prefix="site-bench-"))
    modality = {"AET": AET, "Host": "127.0.0.1", "Port": free_port(), "AllowFind": True, "AllowGet": True,
                "AllowStore": True, "AllowEcho": True, "AllowMove": False}
    orthanc = OrthancServer(work, {"DicomModalities": {"research": modality}})
    out: dict = {"studies": len(cases), "files_in_pacs": sum(len(c[k]) for c in cases for k in ("mr", "pet", "fusion"))}
    try:
        out["store_s"] = _timed([dcmtk("storescu"), "-aet", AET, "-aec", "PACS", "+sd", "+r", "-nh", "127.0.0.1",
                                 str(orthanc.dicom_port), str(a.cohort)])
        rows = work / "rows.csv"
        rows.write_text("accession_number\n" + "".join(
            f"{_accession(a.cohort / c['mr'][0])}\n" for c in cases))
        py = [sys.executable, "-m", "training", "retrieve", "--csv", str(rows), "--host", "127.0.0.1",
              "--port", str(orthanc.dicom_port), "--called-aet", "PACS", "--calling-aet", AET]
        for workers in (1, 2):
            export = work / f"export{workers}"
            out[f"retrieve_workers{workers}_s"] = _timed([*py, "--out", str(export), "--workers", str(workers)])
        out["retrieve_resume_s"] = _timed([*py, "--out", str(work / "export2"), "--workers", "2"])
        with open(work / "export2" / "retrieve-report.csv", newline="") as fh:
            out["report"] = sorted({r["status"] for r in csv.DictReader(fh)})
        peer = work / "getscu"
        t0 = time.perf_counter()
        for c in cases:
            for series in (c["mr_series_uid"], c["pet_series_uid"]):
                dest = peer / series
                dest.mkdir(parents=True)
                subprocess.run([dcmtk("getscu"), "-aet", AET, "-aec", "PACS", "-S", "-k", "QueryRetrieveLevel=SERIES",
                                "-k", f"StudyInstanceUID={c['study_uid']}", "-k", f"SeriesInstanceUID={series}",
                                "-od", str(dest), "127.0.0.1", str(orthanc.dicom_port)],
                               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out["getscu_s"] = round(time.perf_counter() - t0, 1)
        got = sum(1 for _ in (work / "export1").rglob("*.dcm"))
        want = sum(1 for _ in peer.rglob("*"))
        out["instances"] = {"retrieve": got, "getscu": want - 2 * len(cases)}  # minus the folders
        out["ratio_retrieve_to_getscu"] = round(out["retrieve_workers1_s"] / out["getscu_s"], 2)
    finally:
        orthanc.stop()
    shutil.copy(a.cohort / "cases.json", work / "export1")  # the phantom's labels (lesion, uptake) for the pairs
    key = work / "site.key"
    build = [sys.executable, "-m", "training", "build-dataset", "--site-key", str(key)]
    out["build_raw_pet_s"] = _timed([*build, "--export", str(work / "export1"), "--out", str(work / "raw"),
                                     "--from", "raw-pet"])
    out["build_fusion_sc_s"] = _timed([*build, "--export", str(a.cohort), "--out", str(work / "sc"),
                                       "--from", "fusion-sc"])
    out.update(compare_data_sets(work / "raw", work / "sc"))
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


def compare_data_sets(raw_dir: Path, sc_dir: Path) -> dict:
    """PSNR and SSIM of the raw-PET fusions against the fusion-SC ones, slice by slice (matched by
    phantom case and slice), in chunks so that memory stays small."""
    raw, sc = _pairs(raw_dir), _pairs(sc_dir)
    index = {(r["phantom_case"], r["slice_index"]): int(r["index"]) for r in sc}
    fr, fs = np.load(raw_dir / "fusion.npy", mmap_mode="r"), np.load(sc_dir / "fusion.npy", mmap_mode="r")
    ia = [int(r["index"]) for r in raw]
    ib = [index[(r["phantom_case"], r["slice_index"])] for r in raw]
    p, q = [], []
    for k in range(0, len(ia), 32):
        x = np.moveaxis(fr[ia[k:k + 32]], -1, 1)
        y = np.moveaxis(fs[ib[k:k + 32]], -1, 1)
        p.append(np.atleast_1d(psnr(x, y)))
        q.append(np.atleast_1d(ssim(x, y)))
    return {"pairs": {"raw_pet": len(raw), "fusion_sc": len(sc)},
            "raw_vs_sc": {"psnr": round(float(np.mean(np.concatenate(p))), 2),
                          "ssim": round(float(np.mean(np.concatenate(q))), 4)}}


def _accession(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).AccessionNumber)


if __name__ == "__main__":
    main()
