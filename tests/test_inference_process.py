"""Inference runs in its own process: a processor that hangs, aborts or eats memory fails its job
with the reason, the node keeps answering C-ECHO and C-STORE throughout, and the next series is
processed by a fresh inference process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dicomnode.config import config_from_dict
from dicomnode.journal import JobState
from dicomnode.node import Node
from tests.support.dicomfactory import make_series
from tests.support.doubles import MisbehavingProcessor
from tests.support.nodehelpers import make_raw_config, write_toml
from tests.support.peers import dcmtk, free_port, run, wait_for_node
from tests.support.tinymodel import TINY_INFERENCE, make_tiny_model

pytestmark = pytest.mark.integration


def send(port: int, folder: Path, description: str, slices: int = 4) -> list[Path]:
    files = make_series(folder, slices=slices, description=description)
    run([dcmtk("storescu"), "-aec", "DICOMNODE", "127.0.0.1", str(port), *map(str, files)])
    return files


def echo_ok(port: int) -> bool:
    return run([dcmtk("echoscu"), "-to", "5", "-aec", "DICOMNODE", "127.0.0.1", str(port)], check=False).returncode == 0


def job_of(node: Node, files: list[Path]):
    from pydicom import dcmread

    uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    jobs = [j for j in node.journal.jobs() if j.series_uid == uid]
    return jobs[-1] if jobs else None


def wait_state(node: Node, files: list[Path], states: tuple[str, ...], timeout: float = 60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = job_of(node, files)
        if job is not None and job.state in states:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job did not reach {states}: {job_of(node, files)}")


def make_node(tmp_path: Path, port: int, **inference) -> Node:
    cfg = config_from_dict(make_raw_config(
        tmp_path, port, series={"quiet_seconds": 2.0, "settle_seconds": 0.1}, rules={"min_slices": 3},
        inference={"timeout_seconds": 30.0, "crash_retries": 0, **inference}))
    return Node(cfg, MisbehavingProcessor(), serve_metrics=False)


def test_a_hung_inference_is_killed_by_the_watchdog(tmp_path, port):
    with make_node(tmp_path, port, timeout_seconds=4.0) as node:
        first_pid = node.engine.pid
        hang = send(port, tmp_path / "hang", "t2_tse_fs_sag HANG")
        wait_state(node, hang, ("processing",))
        # while inference hangs, the node receives: C-ECHO and a whole new series
        assert echo_ok(port)
        good = send(port, tmp_path / "good", "t2_tse_fs_sag")
        job = wait_state(node, hang, ("failed",), timeout=30)
        assert job.error.startswith("inference exceeded 4 s"), job.error
        assert wait_state(node, good, ("done",), timeout=60).outputs == 4
        assert node.engine.pid not in (None, first_pid)  # a fresh process took over
        assert echo_ok(port)
        assert node.metrics.inference_restarts.labels("timeout")._value.get() == 1


def test_an_aborting_processor_fails_its_job_after_its_retries(tmp_path, port):
    with make_node(tmp_path, port, crash_retries=1) as node:
        boom = send(port, tmp_path / "abort", "t2_tse_fs_sag ABORT")
        job = wait_state(node, boom, ("failed",), timeout=60)
        assert "the inference process was killed by SIGABRT during job" in job.error
        assert job.attempts == 1  # tried twice: the first crash was retried once
        assert echo_ok(port)
        good = send(port, tmp_path / "good", "t2_tse_fs_sag")
        assert wait_state(node, good, ("done",), timeout=60).outputs == 4
        assert node.metrics.inference_restarts.labels("crash")._value.get() == 2


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_a_processor_eating_memory_is_killed_and_the_node_goes_on(tmp_path, port):
    """The test stands in for the kernel's OOM killer: SIGKILL once the process passes 400 MB."""
    with make_node(tmp_path, port) as node:
        parent_rss = rss_mb(os.getpid())
        hog = send(port, tmp_path / "hog", "t2_tse_fs_sag ALLOCATE")
        wait_state(node, hog, ("processing",))
        pid, peak, deadline = node.engine.pid, 0.0, time.time() + 60
        while time.time() < deadline:
            peak = rss_mb(pid)
            if peak > 400:
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        assert peak > 400
        assert echo_ok(port)
        job = wait_state(node, hog, ("failed",), timeout=30)
        assert "killed by SIGKILL (out of memory?)" in job.error
        good = send(port, tmp_path / "good", "t2_tse_fs_sag")
        assert wait_state(node, good, ("done",), timeout=60).outputs == 4
        assert rss_mb(os.getpid()) - parent_rss < 100  # the memory was the inference process's, not ours


def test_a_processor_exception_fails_only_its_job(tmp_path, port):
    with make_node(tmp_path, port) as node:
        pid = node.engine.pid
        bad = send(port, tmp_path / "raise", "t2_tse_fs_sag RAISE")
        job = wait_state(node, bad, ("failed",))
        assert job.error == "ValueError: test double raised on purpose"
        good = send(port, tmp_path / "good", "t2_tse_fs_sag")
        wait_state(node, good, ("done",))
        assert node.engine.pid == pid  # an exception does not cost a restart


@pytest.mark.slow
def test_serve_parent_memory_is_flat_over_20_jobs(tmp_path):
    """The real `dicomnode serve` with a tiny model: after 10 warm-up jobs (caches, thread stacks),
    the receiving process's RSS stays flat over the next 20; the model lives in the inference
    process. Measured: +6 MB over the first 10 jobs, +1 MB from job 10 to 30, +0.03 MB from 30 to 60."""
    port, model = free_port(), make_tiny_model(tmp_path / "tiny")
    raw = make_raw_config(tmp_path, port, series={"quiet_seconds": 2.0, "settle_seconds": 0.1},
                          rules={"min_slices": 3},
                          inference=dict(TINY_INFERENCE, model=str(model), device="cpu"))
    toml = write_toml(tmp_path / "node.toml", raw)
    proc = subprocess.Popen([sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(toml)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rss = {}
    try:
        wait_for_node(proc, port)
        from dicomnode.journal import Journal

        journal = Journal(tmp_path / "store" / "journal.sqlite")
        for n in range(1, 31):
            send(port, tmp_path / f"s{n}", "t2_tse_fs_sag", slices=4)
            deadline = time.time() + 60
            while journal.state_counts()[JobState.DONE] < n:
                assert time.time() < deadline, journal.state_counts()
                time.sleep(0.1)
            if n in (10, 30):
                rss[n] = rss_mb(proc.pid)
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        child_rss = sum(rss_mb(int(c)) for c in children)  # the inference process and the resource tracker
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"serve RSS after 10 jobs {rss[10]:.1f} MB, after 30 {rss[30]:.1f} MB; inference process {child_rss:.1f} MB")
    assert rss[30] - rss[10] < 4, rss
    assert child_rss > rss[30] * 2  # torch and the model are over there (a tiny model, still a big library)


PARENT = """
import time
from tests.support.doubles import CopyProcessor
from dicomnode.engine import InferenceRequest
from dicomnode.localengine import InferenceProcess
engine = InferenceProcess(CopyProcessor(delay=120.0))
engine.start()
print(engine.pid, flush=True)
{job}
time.sleep(120)
"""


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "mid-job"])
def test_the_inference_process_exits_when_the_node_is_killed(tmp_path, busy):
    files = make_series(tmp_path / "in", slices=2, rows=16, cols=16)
    job = (f"engine.run(InferenceRequest(1, '1.2', '1.2.3', {tuple(map(str, files))!r}, {str(tmp_path / 'out')!r}), 300)"
           if busy else "")
    node = subprocess.Popen([sys.executable, "-c", PARENT.format(job=job)], cwd=Path(__file__).parents[1],
                            stdout=subprocess.PIPE, text=True)
    try:
        child = int(node.stdout.readline())
        time.sleep(1.0)  # the job has started
        assert _alive(child)
        node.kill()
        node.wait(10)
        deadline = time.monotonic() + 1.0
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _alive(child), "the inference process outlived its node by more than a second"
    finally:
        node.kill()


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by init, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"
