"""The Ray backend on a real one-machine Ray (started by the node, with a fixed CPU count) and the
tiny random-weights model: the same outputs as the local backend, a worker killed mid-job still
gives exactly one result series, and the restartable archive mode.

Ray 2.60 maps 127.0.0.1 to the machine's address and listens on every interface, so these tests
run in a private network namespace that has only loopback (`unshare -n`, as root): the first
test below re-runs this module there, and the others run only inside it."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from dicomnode.config import config_from_dict
from dicomnode.engine import Synthesis
from dicomnode.journal import JobState
from dicomnode.node import Node
from tests.support.dicomfactory import make_series
from tests.support.nodehelpers import Sink, make_raw_config, wait_for
from tests.support.peers import dcmtk, free_port, run
from tests.support.tinymodel import TINY_INFERENCE, make_calibrated_tiny_model, make_tiny_model, ood_series

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.integration, pytest.mark.ray]
IN_PRIVATE_NETWORK = os.environ.get("DICOMNODE_TEST_NETNS") == "1"
inside = pytest.mark.skipif(not IN_PRIVATE_NETWORK, reason="runs inside the loopback-only network namespace "
                            "(test_ray_tests_in_a_loopback_only_network)")


def test_ray_tests_in_a_loopback_only_network():
    """Re-run this module where the only interface is loopback, so Ray cannot listen elsewhere."""
    import shutil

    if IN_PRIVATE_NETWORK:
        pytest.skip("this is the run inside the namespace")
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if os.geteuid() != 0 or not unshare or not ip:
        pytest.skip("needs root, unshare (util-linux) and ip (iproute2) for a private network namespace")
    inner = f"ip link set lo up && DICOMNODE_TEST_NETNS=1 exec {sys.executable} -m pytest -q -p no:cacheprovider {__file__}"
    proc = subprocess.run([unshare, "-n", "sh", "-c", inner], capture_output=True, text=True, timeout=1200,
                          cwd=Path(__file__).resolve().parents[1])
    tail = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert re.search(r"^5 passed", proc.stdout, re.M), tail  # all of them ran (none skipped) inside


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def node_config(root: Path, port: int, tiny: Path, backend: str, **extra) -> dict:
    inference = {"model": str(tiny), **TINY_INFERENCE, "backend": backend, "ray_address": "local", **extra}
    return make_raw_config(root, port, inference=inference, series={"quiet_seconds": 1.0})


def send(port: int, files: list[Path]) -> None:
    run([dcmtk("storescu"), "-aec", "DICOMNODE", "127.0.0.1", str(port), *map(str, files)])


def outputs(node: Node) -> dict[str, str]:
    """SOP Instance UID -> hash of (Series UID, pixels) of every encoded output in the spool."""
    found = {}
    for job in node.journal.jobs():
        for path in sorted(Path(job.output_dir or "/nonexistent").glob("*.dcm")):
            ds = dcmread(path)
            found[str(ds.SOPInstanceUID)] = hashlib.sha256(str(ds.SeriesInstanceUID).encode() + ds.PixelData).hexdigest()
    return found


@inside
def test_ray_backend_makes_the_same_series_as_the_local_one(tmp_path, tiny):
    files = make_series(tmp_path / "in", slices=8, rows=64, cols=64, seed=3)
    results = {}
    for backend in ("local", "ray"):
        port = free_port()
        cfg = config_from_dict(node_config(tmp_path / backend, port, tiny, backend, ray_actors=2))
        with Node(cfg, Synthesis(cfg.inference)) as node:
            assert wait_for(lambda: node.readiness().ok, 120), node.readiness()
            send(port, files)
            assert wait_for(lambda: node.journal.jobs() and node.journal.jobs()[0].state in ("done", "failed"), 120)
            assert node.journal.state_counts()[JobState.DONE] == 1, node.journal.jobs()
            results[backend] = outputs(node)
            if backend == "ray":
                (check,) = [c for c in node.readiness().checks if c.name == "model"]
                assert "2 Ray actor(s)" in check.detail
    assert len(results["local"]) == 8
    assert results["ray"] == results["local"]  # same UIDs, same pixels


@inside
def test_a_refusal_by_the_safety_gate_on_a_ray_worker_ends_the_job_ignored(tmp_path):
    """The gate runs on the worker; its refusal crosses Ray as the engine's InferenceRefused: the
    job ends 'ignored' with the reason, is not retried and sends nothing."""
    gated = make_calibrated_tiny_model(tmp_path / "gated")
    sink = Sink()
    port = free_port()
    raw = node_config(tmp_path / "node", port, gated, "ray", ray_actors=1)
    raw["destinations"] = [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": sink.port}]
    cfg = config_from_dict(raw)
    try:
        with Node(cfg, Synthesis(cfg.inference)) as node:
            assert wait_for(lambda: node.readiness().ok, 120), node.readiness()
            send(port, ood_series(tmp_path / "in", "noise"))
            assert wait_for(lambda: node.journal.jobs() and node.journal.jobs()[0].state in
                            (JobState.IGNORED, JobState.DONE, JobState.FAILED), 120)
            (job,) = node.journal.jobs()
            assert job.state == JobState.IGNORED, job
            assert job.reason.startswith("input outside the model's training data: score"), job.reason
            assert job.attempts == 0 and not job.outputs
    finally:
        sink.server.shutdown()
    assert not sink.arrivals


@inside
def test_a_worker_killed_mid_job_still_delivers_one_result_series(tmp_path, tiny):
    sink = Sink()
    port = free_port()
    raw = node_config(tmp_path, port, tiny, "ray", ray_actors=1)
    raw["destinations"] = [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": sink.port}]
    cfg = config_from_dict(raw)
    files = make_series(tmp_path / "in", slices=24, rows=256, cols=256, seed=5)
    try:
        with Node(cfg, Synthesis(cfg.inference)) as node:
            assert wait_for(lambda: node.engine.ready, 120)
            worker_pid = node.engine.info["pid"]
            send(port, files)
            assert wait_for(lambda: node.journal.state_counts()[JobState.PROCESSING] == 1, 60, interval=0.005)
            os.kill(worker_pid, signal.SIGKILL)  # the actor's worker process, mid-job
            assert wait_for(lambda: node.journal.jobs()[0].state in (JobState.DONE, JobState.FAILED), 180)
            (job,) = node.journal.jobs()
            assert job.state == JobState.DONE, job
            # Killed during the job's call: it crashed once and was retried (attempts 1). Killed a
            # moment earlier, while the job was being handed over: the engine waited for Ray to
            # restart the actor and ran it there (attempts 0). Either way a new worker did the job.
            assert job.attempts in (0, 1)
            assert ray.get(node.engine._actors[0].info.remote())["pid"] != worker_pid
            if job.attempts == 1:  # the retry names the crash
                assert any("Ray actor" in (e["detail"] or "") for e in node.journal.events(job.id)) \
                    or "Ray actor" in (job.error or "")
    finally:
        sink.server.shutdown()
    series = {s for _, s, _ in sink.arrivals}
    by_sop: dict[str, set] = {}
    for sop, _, pixels in sink.arrivals:
        by_sop.setdefault(sop, set()).add(pixels)
    assert len(series) == 1 and len(by_sop) == 24
    assert all(len(p) == 1 for p in by_sop.values())  # a re-sent instance is the same instance


@inside
def test_archive_mode_on_ray_is_restartable(tmp_path, tiny):
    for k in range(3):
        make_series(tmp_path / "in" / f"s{k}", slices=8, rows=48, cols=48, seed=10 + k)
    conf = tmp_path / "c.toml"
    conf.write_text("[inference]\n" + "".join(f"{k} = {v}\n" for k, v in TINY_INFERENCE.items()))
    cmd = [sys.executable, "-m", "dicomnode.cli", "infer", str(tmp_path / "in"), str(tmp_path / "out"), "--ray",
           "local", "--actors", "2", "--all", "--model", str(tiny), "-c", str(conf)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    import json

    summary = json.loads((tmp_path / "out" / "infer.json").read_text())
    assert len(summary) == 3 and all(o["outputs"] == 8 and not o["error"] for o in summary)
    folders = sorted(p for p in (tmp_path / "out").iterdir() if p.is_dir())
    assert len(folders) == 3 and all(len(list(f.glob("*.dcm"))) == 8 for f in folders)
    stamp = {p: p.stat().st_mtime_ns for f in folders for p in f.glob("*.dcm")}
    # one output series lost (say, an interrupted run): only that one is made again
    victim = folders[0]
    for p in victim.glob("*.dcm"):
        p.unlink()
    time.sleep(0.01)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(list(victim.glob("*.dcm"))) == 8
    untouched = {p: p.stat().st_mtime_ns for f in folders[1:] for p in f.glob("*.dcm")}
    assert untouched == {p: t for p, t in stamp.items() if p.parent != victim}


@inside
def test_an_unreachable_cluster_keeps_jobs_waiting_and_readyz_false(tmp_path, tiny):
    """`serve` with a cluster address nobody answers: the node receives and selects, /readyz says
    why it is not ready, the job stays 'selected' (never failed, no attempt counted), and SIGTERM
    still stops the node while Ray keeps trying to connect."""
    import json
    import urllib.error
    import urllib.request

    from dicomnode.journal import Journal
    from tests.support.nodehelpers import write_toml
    from tests.support.peers import wait_for_node

    port, metrics_port = free_port(), free_port()
    raw = node_config(tmp_path, port, tiny, "ray", ray_address=f"127.0.0.1:{free_port()}")
    raw["metrics"] = {"enabled": True, "port": metrics_port}
    toml = write_toml(tmp_path / "node.toml", raw)
    proc = subprocess.Popen([sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(toml)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_node(proc, port)
        send(port, make_series(tmp_path / "in", slices=8, rows=48, cols=48, seed=21))

        def readyz():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=5) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read())

        journal = Journal(tmp_path / "store" / "journal.sqlite")
        assert wait_for(lambda: journal.state_counts()[JobState.SELECTED] == 1, 30), journal.jobs()
        time.sleep(2.0)  # several worker ticks: still waiting, not failed
        (job,) = journal.jobs()
        assert job.state == JobState.SELECTED and job.attempts == 0
        status, body = readyz()
        assert status == 503 and not body["checks"]["model"]["ok"]
        assert "Ray cluster 127.0.0.1:" in body["checks"]["model"]["detail"]
        proc.terminate()
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
