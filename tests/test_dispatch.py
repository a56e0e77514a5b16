"""Dispatch to a real DCMTK storescp sink: delivery, retry after an outage, dead letter, re-drive."""

import random
import subprocess
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.config import config_from_dict
from dicomnode.dispatch import backoff_delay
from dicomnode.node import Node
from tests.support.dicomfactory import make_series
from tests.support.doubles import CopyProcessor
from tests.support.nodehelpers import make_raw_config, wait_for, write_toml
from tests.support.peers import dcmtk, free_port, run

pytestmark = pytest.mark.integration


class Sink:
    """A DCMTK storescp on loopback that can be stopped and started again on the same port."""

    def __init__(self, folder: Path, port: int):
        self.folder, self.port, self.proc = folder, port, None
        folder.mkdir(parents=True, exist_ok=True)

    def start(self):
        self.proc = subprocess.Popen([dcmtk("storescp"), "-aet", "SINK", "-od", str(self.folder), str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while time.time() < deadline:
            if run([dcmtk("echoscu"), "-aec", "SINK", "127.0.0.1", str(self.port)], check=False).returncode == 0:
                return self
            if self.proc.poll() is not None:  # it exited (port taken?): say so now, not after 10 s
                break
            time.sleep(0.1)
        raise RuntimeError(f"storescp did not start on port {self.port} (exit status {self.proc.poll()})")

    def stop(self):
        if self.proc:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def files(self):
        return sorted(self.folder.glob("*"))


@pytest.fixture
def sink(tmp_path):
    s = Sink(tmp_path / "sink", free_port())
    yield s
    s.stop()


def setup(tmp_path, port, sink, **dispatch):
    raw = make_raw_config(tmp_path, port, series={"quiet_seconds": 2.0},
                          destinations=[{"name": "sink", "ae_title": "SINK", "host": "127.0.0.1", "port": sink.port}],
                          dispatch=dispatch)
    return write_toml(tmp_path / "node.toml", raw), config_from_dict(raw)


def send_series(port, tmp_path, slices=4):
    files = make_series(tmp_path / "in", slices=slices)
    run([dcmtk("storescu"), "-aec", "DICOMNODE", "127.0.0.1", str(port), *map(str, files)])
    return files


def test_delivered_to_sink(tmp_path, port, sink):
    sink.start()
    _, cfg = setup(tmp_path, port, sink)
    with Node(cfg, CopyProcessor()) as node:
        send_series(port, tmp_path, slices=8)
        assert node.wait_idle(20)
        (job,) = node.journal.jobs()
        assert job.state == "done" and job.outputs == 8
        assert {"load", "write", "process_total", "select"} <= set(job.timings)
    assert len(sink.files()) == 8


def test_sink_down_then_up_is_delivered_after_a_retry(tmp_path, port, sink):
    _, cfg = setup(tmp_path, port, sink, backoff_initial_seconds=0.5, backoff_max_seconds=1.0)
    with Node(cfg, CopyProcessor()) as node:
        send_series(port, tmp_path, slices=8)
        assert wait_for(lambda: any(d.attempts >= 1 for d in node.journal.deliveries()), 15)
        (d,) = node.journal.deliveries()
        assert d.state == "pending" and "cannot associate" in d.last_error
        reachable = lambda: node.metrics.registry.get_sample_value("dicomnode_destination_reachable",  # noqa: E731
                                                                   {"destination": "sink"})
        assert reachable() == 0
        sink.start()
        assert wait_for(lambda: node.journal.jobs()[0].state == "done", 15)
        (d,) = node.journal.deliveries()
        assert d.attempts >= 2 and d.state == "delivered" and reachable() == 1
    assert len(sink.files()) == 8


def test_dead_letter_then_queue_retry(tmp_path, port, sink):
    toml, cfg = setup(tmp_path, port, sink, backoff_initial_seconds=0.3, backoff_max_seconds=0.5,
                      give_up_after_seconds=1.5)
    with Node(cfg, CopyProcessor()) as node:
        send_series(port, tmp_path, slices=8)
        assert wait_for(lambda: node.journal.jobs()[0].state == "dead_letter", 20)
        (d,) = node.journal.deliveries()
        assert d.state == "dead_letter" and d.attempts >= 2

        listing = CliRunner().invoke(app, ["queue", "list", "--config", str(toml), "--state", "dead_letter"])
        assert listing.exit_code == 0 and "dead_letter" in listing.output
        sink.start()
        result = CliRunner().invoke(app, ["queue", "retry", "--config", str(toml), "--all-dead"])
        assert result.exit_code == 0, result.output
        assert wait_for(lambda: node.journal.jobs()[0].state == "done", 15)
    assert len(sink.files()) == 8


def test_failed_processing_is_recorded_and_can_be_retried(tmp_path, port, sink):
    toml, cfg = setup(tmp_path, port, sink)
    failing = tmp_path / "fail-while-this-exists"
    failing.touch()
    with Node(cfg, CopyProcessor(fail_while=failing)) as node:
        send_series(port, tmp_path, slices=8)
        assert wait_for(lambda: node.journal.jobs() and node.journal.jobs()[0].state == "failed", 15)
        assert "test double asked to fail" in node.journal.jobs()[0].error
        run([dcmtk("echoscu"), "-aec", "DICOMNODE", "127.0.0.1", str(port)])  # still serving
        failing.unlink()
        sink.start()
        assert CliRunner().invoke(app, ["queue", "retry", "--config", str(toml), "--all-failed"]).exit_code == 0
        assert wait_for(lambda: node.journal.jobs()[0].state == "done", 15)


def test_backoff_is_exponential_capped_and_jittered():
    rng = random.Random(1)
    delays = [backoff_delay(n, 30, 3600, rng) for n in range(1, 12)]
    assert 15 <= delays[0] <= 30 and 30 <= delays[1] <= 60
    assert all(1800 <= d <= 3600 for d in delays[-3:])
    assert len({round(d, 6) for d in delays}) == len(delays)


@pytest.mark.parametrize("warning", [0xB000, 0xB006, 0xB007])
def test_warning_statuses_count_as_stored(tmp_path, port, warning):
    """A pynetdicom storage SCP that answers every C-STORE with a warning status."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    scp = AE(ae_title="SINK")
    scp.supported_contexts = AllStoragePresentationContexts
    sink_port = free_port()
    server = scp.start_server(("127.0.0.1", sink_port), block=False,
                              evt_handlers=[(evt.EVT_C_STORE, lambda event: warning)])
    try:
        raw = make_raw_config(tmp_path, port, series={"quiet_seconds": 2.0},
                              destinations=[{"name": "warn", "ae_title": "SINK", "host": "127.0.0.1",
                                             "port": sink_port}])
        with Node(config_from_dict(raw), CopyProcessor()) as node:
            send_series(port, tmp_path, slices=8)
            assert wait_for(lambda: node.journal.jobs() and node.journal.jobs()[0].state == "done", 15)
            (d,) = node.journal.deliveries()
            assert d.state == "delivered" and d.attempts == 1
    finally:
        server.shutdown()


class CountingSink:
    """A pynetdicom storage SCP that records every arrival (duplicates included) and, once, cuts
    the connection when instance `cut_after + 1` arrives, before storing or answering it."""

    def __init__(self, cut_after: int | None = None):
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.arrivals: list[str] = []
        self.cut_after, self.cut = cut_after, False
        ae = AE(ae_title="SINK")
        ae.supported_contexts = AllStoragePresentationContexts
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self.on_store)])

    def on_store(self, event) -> int:
        if self.cut_after is not None and not self.cut and len(self.arrivals) == self.cut_after:
            self.cut = True
            event.assoc.dul.socket.close()  # as a crashing PACS or a dropped link would
            return 0xC001
        self.arrivals.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def stop(self):
        self.server.shutdown()


class BlackHole:
    """Accepts TCP connections and never answers (a PACS whose process hangs)."""

    def __init__(self):
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.held: list = []
        self.stopping = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def stop(self):
        self.stopping = True
        self.sock.close()
        for conn in self.held:
            conn.close()


def dest(name, port, **extra):
    return {"name": name, "ae_title": "SINK", "host": "127.0.0.1", "port": port, **extra}


def test_a_retry_sends_only_what_the_destination_has_not_acknowledged(tmp_path, port):
    sink = CountingSink(cut_after=3)
    try:
        raw = make_raw_config(tmp_path, port, series={"quiet_seconds": 1.0, "settle_seconds": 0.1},
                              destinations=[dest("pacs", sink.port)])
        toml = write_toml(tmp_path / "node.toml", raw)
        with Node(config_from_dict(raw), CopyProcessor()) as node:
            send_series(port, tmp_path, slices=8)
            assert wait_for(lambda: node.journal.jobs() and node.journal.jobs()[0].state == "done", 30)
            (d,) = node.journal.deliveries()
            assert sink.cut and d.attempts == 2
            assert len(node.journal.delivered_instances(d.job_id, "pacs")) == 8
        assert len(sink.arrivals) == 8 and len(set(sink.arrivals)) == 8  # each once: 3, cut, then the other 5
        # An operator may ask for everything again: the one way a destination receives an instance twice.
        r = CliRunner().invoke(app, ["queue", "resend", "--config", str(toml), str(d.job_id)])
        assert r.exit_code == 0 and "sending" in r.output, r.output
        with Node(config_from_dict(raw), CopyProcessor()) as node:
            assert wait_for(lambda: node.journal.jobs()[0].state == "done", 30)
        assert len(sink.arrivals) == 16 and len(set(sink.arrivals)) == 8
        r = CliRunner().invoke(app, ["queue", "resend", "--config", str(toml), "--destination", "elsewhere", str(d.job_id)])
        assert r.exit_code == 1 and "no delivery to elsewhere" in r.output
    finally:
        sink.stop()


def test_a_silent_destination_costs_the_others_nothing(tmp_path, port, sink):
    """Two destinations, one a black hole: the good one's results arrive within seconds of
    encoding, for every job, while the black hole's deliveries wait out its ACSE timeout."""
    hole = BlackHole()
    sink.start()
    try:
        raw = make_raw_config(tmp_path, port, series={"quiet_seconds": 1.0, "settle_seconds": 0.1},
                              rules={"min_slices": 3},
                              destinations=[dest("hole", hole.port, acse_timeout=8.0), dest("sink", sink.port)])
        with Node(config_from_dict(raw), CopyProcessor()) as node:
            for i in range(3):
                send_series(port, tmp_path / f"s{i}", slices=4)
            assert wait_for(lambda: sum(d.state == "delivered" for d in node.journal.deliveries()) == 3, 30)
            assert len(sink.files()) == 12
            latencies = []
            for job in node.journal.jobs():
                events = {e["kind"]: e["at"] for e in node.journal.events(job.id) if e["kind"] in ("encoded",)}
                (good,) = [d for d in node.journal.deliveries(job.id) if d.destination == "sink"]
                latencies.append(good.delivered_at - events["encoded"])
            holes = [d for d in node.journal.deliveries() if d.destination == "hole"]
            assert all(d.state == "pending" and d.delivered_at is None for d in holes)
        print(f"good destination: results delivered {max(latencies):.2f} s at most after encoding "
              f"({', '.join(f'{x:.2f}' for x in latencies)}); black hole ACSE timeout 8 s")
        assert len(latencies) == 3 and max(latencies) < 3.0
    finally:
        hole.stop()


def test_an_unreachable_destination_is_held_as_a_whole(tmp_path):
    """After one attempt finds the destination unreachable, its other deliveries are put off
    without a connection each, and reach the dead letter once past give_up_after_seconds."""
    from pydicom import dcmread

    from dicomnode.dispatch import Dispatcher
    from dicomnode.journal import Instance, Journal

    closed = free_port()  # nothing listens here: connection refused
    cfg = config_from_dict(make_raw_config(tmp_path, free_port(), destinations=[dest("down", closed)],
                                           dispatch={"backoff_initial_seconds": 1.0, "backoff_max_seconds": 1.0,
                                                     "give_up_after_seconds": 2.0}))
    journal = Journal(tmp_path / "j.sqlite")
    for j in range(3):
        files = make_series(tmp_path / f"out{j}", slices=2, rows=16, cols=16, seed=j)
        for f in files:
            f.rename(f.with_name(f"{dcmread(f, stop_before_pixels=True).SOPInstanceUID}.dcm"))
        job_id, _ = journal.record_instance(Instance(f"9.{j}", f"9.9.{j}", "9", "1.2.840.10008.5.1.4.1.1.4",
                                                     "1.2.840.10008.1.2.1", "/x", 1, "T", time.time(), None, None, None))
        for state in ("complete", "selected", "processing"):
            journal.transition(job_id, state)
        journal.transition(job_id, "encoded", output_dir=str(tmp_path / f"out{j}"), outputs=2)
        journal.start_deliveries(job_id, ["down"])
    dispatcher = Dispatcher(cfg, journal)
    first = journal.deliveries()[0]
    assert dispatcher.attempt(first) is False  # refused: the destination is held from now on
    assert dispatcher.run_due() == 0  # the other two are put off, not attempted
    by_job = {d.job_id: d for d in journal.deliveries()}
    others = [d for job, d in by_job.items() if job != first.job_id]
    assert all(d.attempts == 0 and d.first_attempt_at and d.last_error.startswith("not attempted") for d in others)
    deadline = time.time() + 15
    while time.time() < deadline and journal.jobs(["sending"]):
        while dispatcher.in_flight():
            time.sleep(0.05)
        dispatcher.run_due()
        time.sleep(0.1)
    dispatcher.stop()
    assert [j.state for j in journal.jobs()] == ["dead_letter"] * 3
    attempts = sorted(d.attempts for d in journal.deliveries())
    assert sum(attempts) <= 5, attempts  # probes only, not one connection per delivery per backoff
