"""`dicomnode serve` as a real process: starts from a TOML file, answers DCMTK, exposes /metrics,
and stops cleanly on SIGTERM."""

import ctypes
import os
import signal
import subprocess
import sys
import urllib.request

import pytest

from tests.support.dicomfactory import make_series
from tests.support.nodehelpers import make_raw_config, wait_for, write_toml
from tests.support.peers import dcmtk, free_port, run, wait_for_node

pytestmark = pytest.mark.integration


def test_serve_receives_exposes_metrics_and_stops_on_sigterm(tmp_path, port):
    mport = free_port()
    raw = make_raw_config(tmp_path, port, metrics={"enabled": True, "host": "127.0.0.1", "port": mport},
                          inference={"model": "none"}, series={"quiet_seconds": 1.0})
    toml = write_toml(tmp_path / "node.toml", raw)
    proc = subprocess.Popen([sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(toml)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_node(proc, port, timeout=30)
        files = make_series(tmp_path / "in", slices=9, patient_name="SECRET^NAME")
        run([dcmtk("storescu"), "-aec", "DICOMNODE", "127.0.0.1", str(port), *map(str, files)])
        metrics = lambda: urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()  # noqa: E731
        assert wait_for(lambda: 'dicomnode_jobs{state="selected"} 1.0' in metrics(), 30)  # complete, then selected
        body = metrics()
        assert 'dicomnode_instances_received_total{result="success"} 9.0' in body
        assert "dicomnode_up 1.0" in body
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "stopping" in out
    assert "SECRET" not in out and "PID0001" not in out  # no patient identifiers in logs


def test_serve_refuses_a_missing_model_with_a_clear_message(tmp_path, port):
    raw = make_raw_config(tmp_path, port, inference={"model": str(tmp_path / "no-such-model")})
    toml = write_toml(tmp_path / "node.toml", raw)
    proc = subprocess.run([sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(toml)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3
    assert "cannot load the model" in proc.stderr


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "tgkill"), reason="needs glibc's tgkill (Linux)")
def test_serve_stops_when_sigterm_lands_on_another_thread(tmp_path, port):
    """The kernel may hand a process-directed SIGTERM to any thread; the node must still stop
    (a bare Event.wait() in the main thread never wakes to run the Python handler)."""
    raw = make_raw_config(tmp_path, port, inference={"model": "none"}, series={"quiet_seconds": 1.0})
    proc = subprocess.Popen([sys.executable, "-m", "dicomnode.cli", "serve", "--config",
                             str(write_toml(tmp_path / "node.toml", raw))],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_node(proc, port, timeout=30)
        workers = [int(t) for t in os.listdir(f"/proc/{proc.pid}/task") if int(t) != proc.pid]
        assert workers, "serve runs its listener and stages on threads"
        assert ctypes.CDLL(None, use_errno=True).tgkill(proc.pid, workers[0], signal.SIGTERM) == 0
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert "stopping" in out
