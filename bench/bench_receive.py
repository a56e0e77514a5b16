"""Receive throughput: DCMTK storescu -> dicomnode vs storescu -> DCMTK storescp, side by side.

dicomnode fsyncs every instance (file, folder and journal) before it answers; DCMTK storescp
(3.6.7) does not fsync, so the ratio includes the cost of durability as well as that of Python.
Usage: python bench/bench_receive.py [--n 200] [--size 320]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from dicomnode.node import Node  # noqa: E402

from dicomfactory import make_series  # noqa: E402
from nodehelpers import make_config  # noqa: E402

STORESCU, STORESCP, ECHOSCU = "/usr/bin/storescu", "/usr/bin/storescp", "/usr/bin/echoscu"
# DCMTK leaves Nagle's algorithm on unless TCP_NODELAY=1; with it on, every C-STORE waits ~40 ms
# for a delayed ACK on loopback, which would make the comparison about TCP, not about storage.
os.environ.setdefault("TCP_NODELAY", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def send(port: int, folder: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([STORESCU, "-aec", "DICOMNODE", "+sd", "127.0.0.1", str(port), str(folder)], check=True,
                   capture_output=True)
    return time.perf_counter() - t0


def bench_storescp(folder: Path, work: Path, extra: list[str]) -> float:
    port = free_port()
    out = work / f"scp{len(extra)}"
    out.mkdir()
    proc = subprocess.Popen([STORESCP, *extra, "-od", str(out), str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        while subprocess.run([ECHOSCU, "127.0.0.1", str(port)], capture_output=True).returncode:
            time.sleep(0.05)
        return send(port, folder)
    finally:
        proc.terminate()
        proc.wait()


def bench_dicomnode(folder: Path, work: Path) -> float:
    port = free_port()
    cfg = make_config(work / "node", port, series={"quiet_seconds": 600.0})
    with Node(cfg):
        return send(port, folder)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-receive-"))
    try:
        folder = work / "in"
        for k in range(0, args.n, 20):
            make_series(folder, slices=min(20, args.n - k), rows=args.size, cols=args.size, seed=k)
        mb = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
        fsync_flag = ["--fsync"] if "--fsync" in subprocess.run([STORESCP, "--help"], capture_output=True,
                                                               text=True).stdout else []
        results: dict[str, list[float]] = {"storescp": [], "dicomnode": []}
        if fsync_flag:
            results["storescp --fsync"] = []
        for r in range(args.rounds):  # interleaved, so machine noise hits both sides alike
            for name in results:
                sub = work / f"r{r}-{name.replace(' ', '')}"
                sub.mkdir()
                if name == "dicomnode":
                    results[name].append(bench_dicomnode(folder, sub))
                else:
                    results[name].append(bench_storescp(folder, sub, fsync_flag if "fsync" in name else []))
        best = {k: min(v) for k, v in results.items()}
        print(f"{args.n} instances of {args.size}x{args.size} ({mb:.1f} MB), best of {args.rounds}, storescu sender")
        for name, t in best.items():
            print(f"  {name:<18} {t:6.2f} s  {args.n / t:7.1f} inst/s  {mb / t:6.1f} MB/s")
        print(f"  ratio dicomnode / storescp: {best['dicomnode'] / best['storescp']:.2f}x the time")
        if fsync_flag:
            print(f"  ratio dicomnode / storescp --fsync: {best['dicomnode'] / best['storescp --fsync']:.2f}x the time")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
