"""Delivery under load and with a silent destination, for any checkout of dicomnode (run it with
PYTHONPATH pointing at another checkout to measure that one the same way).

- `burst`: the sending side while both cores are busy (as when the node synthesises): N series
  of 15 instances, each C-STOREd over one association to a DCMTK storescp, with two CPU-bound
  processes beside it and two busy Python threads in the sending process (the node's other
  threads compete for the GIL). Counts the series whose association was lost and the C-STORE responses
  pynetdicom's reactor dropped as "unexpected" (the stolen-response fault).
- `blackhole`: two destinations, a DCMTK storescp and a socket that accepts TCP and never answers
  (default timeouts of that checkout); J encoded jobs are handed to dispatch the way the node's
  dispatch loop does it. Reports how long after hand-over each job reached the good destination.

    python bench/bench_delivery.py burst --series 100
    python bench/bench_delivery.py blackhole --jobs 2
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # the tests' helpers (tests.support)

import dicomnode  # noqa: E402
from dicomnode.scu import store_files  # noqa: E402
from tests.support.dicomfactory import make_series  # noqa: E402


def storescp(folder: Path) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["/usr/bin/storescp", "-aet", "SINK", "-od", str(folder), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc, port


class Counter(logging.Handler):
    def __init__(self):
        super().__init__()
        self.unexpected = 0

    def emit(self, record):
        if "unexpected" in record.getMessage().lower():
            self.unexpected += 1


def burst(n: int, work: Path) -> None:
    sink, port = storescp(work / "sink")
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    busy = threading.Event()

    def spin():  # Python work in the sending process too, as the node's other threads do
        while not busy.is_set():
            sum(range(1000))

    for _ in range(2):
        threading.Thread(target=spin, daemon=True).start()
    counter = Counter()
    logging.getLogger("pynetdicom").addHandler(counter)
    lost = 0
    started = time.perf_counter()
    try:
        for k in range(n):
            files = make_series(work / f"s{k}", slices=15, rows=128, cols=128, seed=k)
            try:
                report = store_files(files, "127.0.0.1", port, "SINK", timeout=10.0)
                lost += not report.ok
            except Exception:
                lost += 1
    finally:
        busy.set()
        for h in hogs:
            h.kill()
        sink.kill()
    print(f"burst: {n} series x 15 instances under 2 CPU hogs and 2 busy threads in {time.perf_counter() - started:.0f} s "
          f"({dicomnode.__file__}): {lost} series with a lost association or a missing response, "
          f"{counter.unexpected} responses dropped as unexpected")


def blackhole(jobs: int, work: Path) -> None:
    from pydicom import dcmread

    from dicomnode.config import config_from_dict
    from dicomnode.dispatch import Dispatcher
    from dicomnode.journal import Instance, Journal

    sink, port = storescp(work / "sink")
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)
    held = []
    threading.Thread(target=lambda: [held.append(hole.accept()) for _ in iter(int, 1)], daemon=True).start()
    cfg = config_from_dict({"node": {"storage_dir": str(work / "store")}, "destinations": [
        {"name": "hole", "ae_title": "HOLE", "host": "127.0.0.1", "port": hole.getsockname()[1]},
        {"name": "sink", "ae_title": "SINK", "host": "127.0.0.1", "port": port}]})
    journal = Journal(work / "store" / "journal.sqlite")
    for j in range(jobs):
        files = make_series(work / f"out{j}", slices=4, rows=64, cols=64, seed=j)
        for f in files:  # dispatch sends files named by their SOP Instance UID
            f.rename(f.with_name(f"{dcmread(f, stop_before_pixels=True).SOPInstanceUID}.dcm"))
        ds = dcmread(sorted((work / f"out{j}").glob("*.dcm"))[0], stop_before_pixels=True)
        job_id, _ = journal.record_instance(Instance(str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID),
                                                     str(ds.StudyInstanceUID), str(ds.SOPClassUID), "1.2.840.10008.1.2.1",
                                                     "/nonexistent", 1, "BENCH", time.time(), None, None, None))
        for state in ("complete", "selected", "processing"):
            journal.transition(job_id, state)
        journal.transition(job_id, "encoded", output_dir=str(work / f"out{j}"), outputs=4)
    handed_over = time.time()
    for job in journal.jobs(["encoded"]):
        journal.start_deliveries(job.id, ["hole", "sink"])
    dispatcher = Dispatcher(cfg, journal)
    stop = threading.Event()

    def loop():  # what the node's dispatch loop thread does
        while not stop.is_set():
            if not dispatcher.run_due():
                stop.wait(0.25)

    threading.Thread(target=loop, daemon=True).start()
    deadline = time.time() + 600
    while time.time() < deadline:
        good = [d for d in journal.deliveries() if d.destination == "sink" and d.state == "delivered"]
        if len(good) == jobs:
            break
        time.sleep(0.1)
    stop.set()
    waits = sorted(d.delivered_at - handed_over for d in journal.deliveries() if d.destination == "sink" and d.delivered_at)
    sink.kill()
    print(f"blackhole: {jobs} jobs ({dicomnode.__file__}): the good destination had them "
          + ", ".join(f"{w:.2f} s" for w in waits) + " after hand-over")
    shutil.rmtree(work, ignore_errors=True)
    os._exit(0)  # a delivery to the black hole may still be waiting out its timeout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["burst", "blackhole"])
    parser.add_argument("--series", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.what == "burst":
            burst(args.series, Path(tmp))
        else:
            blackhole(args.jobs, Path(tmp))


if __name__ == "__main__":
    main()
