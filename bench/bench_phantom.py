"""Benchmark: time `dicomnode phantom` for 50 default-size cases (about 800 slice pairs).

Target (issue 3): under 2 minutes on 2 CPU cores. Usage:
    python bench/bench_phantom.py [--cases 50] [--jobs 2] [--keep OUT_DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from dicomnode.tools.phantom import generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--keep", type=Path, default=None, help="write here and keep the output")
    a = ap.parse_args()
    out = a.keep or Path(tempfile.mkdtemp(prefix="bench_phantom_"))
    try:
        t0 = time.perf_counter()
        records = generate(out, a.cases, a.seed, jobs=a.jobs)
        dt = time.perf_counter() - t0
        slices = sum(r["slices"] for r in records)
        voxels = sum(r["slices"] * r["rows"] * r["cols"] for r in records)
        files = sum(len(r[k]) for r in records for k in ("mr", "pet", "fusion"))
        print(f"phantom: {a.cases} cases, {slices} slice pairs ({files} DICOM files, "
              f"{voxels / 1e6:.0f} Mvoxel of MR) in {dt:.1f} s with {a.jobs} job(s) on {os.cpu_count()} CPUs "
              f"= {dt / slices * 1000:.0f} ms per slice pair; target < 120 s: {'PASS' if dt < 120 else 'FAIL'}")
    finally:
        if a.keep is None:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
