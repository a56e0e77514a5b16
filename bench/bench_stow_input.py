"""STOW-RS input against C-STORE input, into the same node in the same run.

One `dicomnode` node (receive only: `[inference] model = "none"`, metrics on, as served) with
`[dicomweb]` enabled. Each round sends N instances of size^2 (MR, in series of 20 slices, new UIDs
every round) once with DCMTK storescu over one association (C-STORE, TCP_NODELAY=1 as in
bench_receive.py) and once with dicomweb-client
(STOW-RS, `--per-request` instances per request, one request after the other), in alternating
order; the node acknowledges each instance only once it is on disk (fsync) and in the journal.
Medians over the rounds and their ratio are printed.

    python bench/bench_stow_input.py --n 300 --size 512 --rounds 3 [--per-request 50] [--json out.json]
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

import pydicom
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # the tests' helpers (tests.support)

from dicomnode.config import config_from_dict  # noqa: E402
from dicomnode.node import Node  # noqa: E402
from tests.support.dicomfactory import make_series  # noqa: E402
from tests.support.nodehelpers import make_raw_config  # noqa: E402
from tests.support.peers import dcmtk, free_port  # noqa: E402

TOKEN = "bench-token-0123456789abcdef"
# DCMTK leaves Nagle's algorithm on unless TCP_NODELAY=1; with it on, every C-STORE waits ~40 ms for
# a delayed ACK on loopback (bench/bench_receive.py does the same).
os.environ.setdefault("TCP_NODELAY", "1")


def make_input(folder: Path, n: int, size: int, seed: int) -> list[Path]:
    files: list[Path] = []
    for start in range(0, n, 20):
        files += make_series(folder / f"s{start}", slices=min(20, n - start), rows=size, cols=size, seed=seed + start)
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-request", type=int, default=50)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    from dicomweb_client.api import DICOMwebClient

    root = Path(tempfile.mkdtemp(prefix="bench-stow-in-"))
    (root / "tokens").write_text(f"bench {TOKEN}\n")
    port, http_port = free_port(), free_port()
    raw = make_raw_config(root, port, series={"quiet_seconds": 3600.0}, inference={"model": "none"},
                          metrics={"enabled": True, "port": free_port()},
                          dicomweb={"enabled": True, "port": http_port, "tokens_file": str(root / "tokens")})
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {TOKEN}"
    client = DICOMwebClient(url=f"http://127.0.0.1:{http_port}/dicom-web", session=session)
    client.set_http_retry_params(retry=False)
    times: dict[str, list[float]] = {"c-store": [], "stow-rs": []}
    with Node(config_from_dict(raw)) as node:
        expected = 0
        for r in range(a.rounds):
            for way in (["c-store", "stow-rs"] if r % 2 == 0 else ["stow-rs", "c-store"]):
                files = make_input(root / f"{way}-{r}", a.n, a.size, seed=1000 * r + (0 if way == "c-store" else 500))
                t0 = time.perf_counter()
                if way == "c-store":
                    subprocess.run([dcmtk("storescu"), "-aec", "DICOMNODE", "+sd", "+r", "127.0.0.1", str(port),
                                    str(root / f"{way}-{r}")], check=True, capture_output=True)
                else:
                    for k in range(0, len(files), a.per_request):
                        answer = client.store_instances([pydicom.dcmread(f) for f in files[k:k + a.per_request]])
                        assert len(answer.ReferencedSOPSequence) == len(files[k:k + a.per_request])
                times[way].append(time.perf_counter() - t0)
                expected += len(files)
                assert node.journal.instance_count() == expected, "an acknowledged instance is missing"
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"n": a.n, "size": a.size, "per_request": a.per_request, "rounds": a.rounds,
              "median_seconds": med, "images_per_second": {k: a.n / v for k, v in med.items()},
              "stow_over_cstore": med["stow-rs"] / med["c-store"], "runs": times}
    print(f"{a.n} x {a.size}^2 into dicomnode, median of {a.rounds}: C-STORE (DCMTK storescu) {med['c-store']:.2f} s "
          f"({a.n / med['c-store']:.0f}/s), STOW-RS (dicomweb-client, {a.per_request} a request) {med['stow-rs']:.2f} s "
          f"({a.n / med['stow-rs']:.0f}/s); STOW-RS / C-STORE {result['stow_over_cstore']:.2f}")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
