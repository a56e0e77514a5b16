"""STOW-RS against C-STORE: the node's two ways to deliver a series, to the same Orthanc.

One Orthanc (Debian, with its DICOMweb plugin) on loopback. Each repetition delivers one
synthetic-sized series (15 RGB Secondary Capture images of 512 x 512, 768 KiB each, new UIDs
every time) once with `dicomnode.stow.stow_files` (one HTTP request per `--per-request`
instances, basic authentication) and once with `dicomnode.scu.store_files` (one association,
one C-STORE per image), in alternating order, and, as the reference peer for C-STORE, with
DCMTK's storescu (one association, the same files); the medians and ratios are printed.

Orthanc runs as Debian ships it; `--nodelay` starts it (and storescu) with TCP_NODELAY=1, which
turns off Nagle's algorithm in DCMTK, the library Orthanc's DICOM side is built on.

    python bench/bench_stow.py --repeat 15 [--per-request 50] [--nodelay] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # the tests' helpers (tests.support)

from dicomnode.config import DestinationConfig  # noqa: E402
from dicomnode.scu import StoreReport, Timeouts, store_files  # noqa: E402
from dicomnode.stow import stow_files  # noqa: E402
from tests.support.orthanc import OrthancServer  # noqa: E402
from tests.support.peers import dcmtk  # noqa: E402

DICOMWEB = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def write_series(folder: Path, n: int, size: int, rng: np.random.Generator) -> list[Path]:
    folder.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(n):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        ds.SOPClassUID = SecondaryCaptureImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.PatientName, ds.Modality, ds.InstanceNumber = "BENCH", "BENCH^STOW", "OT", i + 1
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = rng.integers(0, 256, (size, size, 3), dtype=np.uint8).tobytes()
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--images", type=int, default=15)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--per-request", type=int, default=50)
    ap.add_argument("--nodelay", action="store_true", help="TCP_NODELAY=1 for Orthanc and storescu")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    if a.nodelay:
        os.environ["TCP_NODELAY"] = "1"  # inherited by Orthanc and storescu
    root = Path(tempfile.mkdtemp(prefix="bench-stow-"))
    secret = root / "secret"
    secret.write_text("bench:bench-pw\n")
    orthanc = OrthancServer(root, {"DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
                                   "DicomModalities": {"node": ["NODE", "127.0.0.1", 104]}},
                            plugins=[DICOMWEB], users={"bench": "bench-pw"})
    dest = DestinationConfig(name="web", url=orthanc.url("/dicom-web"), auth="basic", credentials_file=secret,
                             instances_per_request=a.per_request)
    rng = np.random.default_rng(0)
    times: dict[str, list[float]] = {"stow": [], "cstore": [], "storescu": []}
    try:
        for r in range(a.repeat + 1):  # the first round warms both paths and is not counted
            order = ["stow", "cstore", "storescu"] if r % 2 else ["storescu", "cstore", "stow"]
            for way in order:
                files = write_series(root / f"{way}-{r}", a.images, a.size, rng)
                t0 = time.perf_counter()
                if way == "stow":
                    report = stow_files(files, dest)
                elif way == "storescu":
                    subprocess.run([dcmtk("storescu"), "-aet", "NODE", "-aec", "PACS", "127.0.0.1",
                                    str(orthanc.dicom_port), *map(str, files)], check=True)
                    report = StoreReport(stored=len(files))
                else:
                    report = store_files(files, "127.0.0.1", orthanc.dicom_port, "PACS", "NODE",
                                         timeout=Timeouts(5, 10, 30, 60))
                elapsed = time.perf_counter() - t0
                assert report.ok and report.stored == a.images, report
                if r:
                    times[way].append(elapsed)
        stored = len(orthanc.get("/instances"))
    finally:
        orthanc.stop()
    assert stored == 3 * a.images * (a.repeat + 1), stored
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"images": a.images, "size": a.size, "per_request": a.per_request, "repeat": a.repeat,
              "tcp_nodelay": a.nodelay,
              "median_seconds": med, "stow_over_cstore": med["stow"] / med["cstore"],
              "stow_over_storescu": med["stow"] / med["storescu"],
              "runs": times}
    print(f"{a.images} RGB images of {a.size}^2 to Orthanc, median of {a.repeat}: STOW-RS {med['stow']:.3f} s, "
          f"C-STORE {med['cstore']:.3f} s (DCMTK storescu {med['storescu']:.3f} s); STOW-RS / C-STORE "
          f"{result['stow_over_cstore']:.2f}, STOW-RS / storescu {result['stow_over_storescu']:.2f}")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
