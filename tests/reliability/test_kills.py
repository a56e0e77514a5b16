"""Seeded SIGKILLs of the real `dicomnode serve` (tiny model) while series arrive, are processed and
are delivered. Afterwards: no acknowledged instance lost, exactly one complete result series per
source series at the PACS, no SOP Instance UID delivered twice with different pixels, no job
stuck. The short form runs in CI; DICOMNODE_RELIABILITY=long runs the long one (see
docs/developer/testing.md)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage

from dicomnode.journal import ACTIVE_STATES, JobState, Journal
from tests.support.dicomfactory import make_series
from tests.support.nodehelpers import Sink, make_raw_config, write_toml
from tests.support.peers import free_port
from tests.support.tinymodel import TINY_INFERENCE, make_tiny_model

pytestmark = pytest.mark.integration

LONG = os.environ.get("DICOMNODE_RELIABILITY") == "long"
SERIES, KILLS = (10, 20) if LONG else (4, 6)


class Serve:
    """`dicomnode serve` as the process systemd would run, killed and restarted at will."""

    def __init__(self, toml: Path, port: int):
        self.toml, self.port, self.proc = toml, port, None
        self.lock = threading.RLock()  # the killer and the sender both restart it: one at a time
        self.started: list[subprocess.Popen] = []

    def start(self) -> None:
        with self.lock:
            if self.proc is not None and self.proc.poll() is None:
                return  # already running (the other thread restarted it)
            self.proc = subprocess.Popen([sys.executable, "-m", "dicomnode.cli", "serve", "--config",
                                          str(self.toml)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.started.append(self.proc)
            deadline = time.time() + 60
            while not self.answers():
                assert self.proc.poll() is None and time.time() < deadline, "serve did not come up"
                time.sleep(0.2)

    def stop_all(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()

    def answers(self) -> bool:
        ae = AE(ae_title="PROBE")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", self.port, ae_title="DICOMNODE")
        ok = assoc.is_established
        if ok:
            assoc.release()
        return ok

    def kill(self) -> None:
        with self.lock:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()  # its inference process exits by itself when the pipe to the node closes


def send_until_acknowledged(port: int, files: list[Path], acked: set[str], rng: random.Random, serve: Serve) -> None:
    """A scanner's behaviour: send each instance; after a failure wait, then resend what is unacknowledged."""
    pending = [f for f in files if str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) not in acked]
    while pending:
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(MRImageStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
        if assoc.is_established:
            for f in list(pending):
                try:
                    status = assoc.send_c_store(f)
                except (RuntimeError, ValueError, OSError):
                    break
                if status and int(status.Status) == 0:
                    acked.add(str(dcmread(f, stop_before_pixels=True).SOPInstanceUID))
                    pending.remove(f)
                time.sleep(rng.uniform(0, 0.15))
            if assoc.is_established:
                assoc.release()
        if pending:
            time.sleep(0.5)
            if serve.proc.poll() is not None:
                serve.start()


@pytest.mark.slow
def test_seeded_kills_lose_nothing_and_duplicate_nothing(tmp_path):
    kill_rng, send_rng = random.Random(20261201), random.Random(20261202)  # one per thread: a seeded run repeats
    sink, port = Sink(), free_port()
    model = make_tiny_model(tmp_path / "tiny")
    raw = make_raw_config(tmp_path, port, series={"quiet_seconds": 3.0, "settle_seconds": 0.2}, rules={"min_slices": 3},
                          inference=dict(TINY_INFERENCE, model=str(model), device="cpu"),
                          destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": sink.port}])
    serve = Serve(write_toml(tmp_path / "node.toml", raw), port)
    series = [make_series(tmp_path / f"s{k}", slices=6, rows=64, cols=64, seed=k) for k in range(SERIES)]
    acked: set[str] = set()
    kills = 0
    serve.start()
    stop = threading.Event()

    def killer():
        nonlocal kills
        while kills < KILLS and not stop.is_set():
            time.sleep(kill_rng.uniform(0.3, 2.5))
            if stop.is_set():
                return
            serve.kill()
            kills += 1
            time.sleep(kill_rng.choice([0.2, 1.0, 4.0]))  # 4 s is longer than quiet_seconds
            serve.start()

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        for files in series:
            send_until_acknowledged(port, files, acked, send_rng, serve)
        t.join(120)
        stop.set()
        if serve.proc.poll() is not None:
            serve.start()
        journal = Journal(tmp_path / "store" / "journal.sqlite")
        deadline = time.time() + 120
        while time.time() < deadline:
            counts = journal.state_counts()
            if not any(counts[s] for s in ACTIVE_STATES):
                break
            time.sleep(0.5)
    finally:
        stop.set()
        t.join(60)
        serve.stop_all()
        sink.server.shutdown()
    assert kills >= min(KILLS, 3), f"only {kills} kills happened"
    # 0 acknowledged instances lost: each is in the journal and on disk
    stored = {i.sop_instance_uid: i for s in series for i in journal.instances(
        str(dcmread(s[0], stop_before_pixels=True).SeriesInstanceUID))}
    assert acked <= set(stored), f"lost: {acked - set(stored)}"
    assert all(Path(stored[u].path).is_file() for u in acked)
    # 0 stuck jobs
    counts = journal.state_counts()
    assert not any(counts[s] for s in ACTIVE_STATES), counts
    # no SOP Instance UID delivered twice with different content
    contents = defaultdict(set)
    for sop, _, digest in sink.arrivals:
        contents[sop].add(digest)
    assert all(len(d) == 1 for d in contents.values())
    # exactly one complete result series per source series
    by_series = defaultdict(set)
    for sop, ser, _ in sink.arrivals:
        by_series[ser].add(sop)
    done = [j for j in journal.jobs() if j.state == JobState.DONE]
    assert len({j.series_uid for j in done}) == SERIES, journal.state_counts()
    assert len(by_series) == SERIES and all(len(sops) == 6 for sops in by_series.values()), \
        {k: len(v) for k, v in by_series.items()}
    print(f"{kills} kills over {SERIES} series: {len(acked)} acknowledged instances, 0 lost, "
          f"{len(sink.arrivals)} deliveries of {sum(len(v) for v in by_series.values())} results, 0 stuck jobs")
