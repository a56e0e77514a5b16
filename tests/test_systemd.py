"""deploy/dicomnode.service: systemd accepts it, its sandbox scores well, and a real round trip of
`dicomnode serve` (receive, synthesise, encode, send) uses only the system calls and socket
families the unit allows, so the sandbox cannot break the daemon.

systemd is not PID 1 here, so the unit is not started; `systemd-analyze` checks it offline and
strace records what the daemon really does.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

import pytest

from tests.support.dicomfactory import make_series
from tests.support.nodehelpers import make_raw_config, write_toml
from tests.support.peers import dcmtk, free_port, run, wait_for_node
from tests.support.tinymodel import TINY_INFERENCE, make_tiny_model

UNIT = Path(__file__).resolve().parents[1] / "deploy" / "dicomnode.service"
pytestmark = pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")


def _unit_value(key: str) -> str:
    values = re.findall(rf"^{key}=(.*)$", UNIT.read_text(), flags=re.M)
    assert len(values) == 1, f"{key} set {len(values)} times in {UNIT.name}"
    return values[0].strip()


def _testable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointed at a binary that exists here (verify checks it)."""
    text = re.sub(r"^ExecStart=\S+", "ExecStart=/usr/bin/true", UNIT.read_text(), flags=re.M)
    path = tmp_path / "dicomnode.service"
    path.write_text(text)
    return path


@lru_cache(maxsize=None)
def _syscalls(group: str) -> frozenset[str]:
    """The system calls of a systemd syscall group, nested groups expanded."""
    out = run(["systemd-analyze", "syscall-filter", group]).stdout.splitlines()[1:]
    calls: set[str] = set()
    for token in (line.strip() for line in out):
        if token.startswith("@"):
            calls |= _syscalls(token)
        elif token and not token.startswith("#"):
            calls.add(token)
    assert calls, f"systemd knows no group {group}"
    return frozenset(calls)


def test_unit_verifies_and_its_sandbox_exposure_is_low(tmp_path):
    unit = _testable_unit(tmp_path)
    proc = run(["systemd-analyze", "verify", str(unit)], check=False)
    assert proc.returncode == 0 and "dicomnode.service" not in proc.stderr, proc.stderr
    report = run(["systemd-analyze", "security", "--offline=yes", str(unit)], check=False).stdout
    exposure = float(re.search(r"Overall exposure level for dicomnode\.service: ([0-9.]+)", report).group(1))
    assert exposure <= 3.0, report  # 2.1 when written; the unhardened unit scored 8.6


@pytest.mark.integration
@pytest.mark.skipif(not shutil.which("strace"), reason="strace not installed")
def test_a_full_round_trip_uses_only_what_the_sandbox_allows(tmp_path, port):
    sink_port = free_port()
    sink = subprocess.Popen([dcmtk("storescp"), "-aet", "SINK", "-od", str(tmp_path / "sink"), str(sink_port)])
    (tmp_path / "sink").mkdir()
    raw = make_raw_config(
        tmp_path, port, series={"quiet_seconds": 1.0},
        inference=dict(TINY_INFERENCE, model=str(make_tiny_model(tmp_path / "tiny")), device="cpu"),
        destinations=[{"name": "sink", "ae_title": "SINK", "host": "127.0.0.1", "port": sink_port}])
    trace = tmp_path / "strace.txt"
    node = subprocess.Popen(["strace", "-f", "-qq", "-o", str(trace), sys.executable, "-m", "dicomnode.cli",
                             "serve", "--config", str(write_toml(tmp_path / "node.toml", raw))],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_node(node, port, timeout=120)  # strace slows the start
        files = make_series(tmp_path / "in", slices=9, rows=48, cols=40)
        run([dcmtk("storescu"), "-aec", "DICOMNODE", "127.0.0.1", str(port), *map(str, files)])
        deadline = time.time() + 180
        while len(list((tmp_path / "sink").iterdir())) < len(files):
            assert node.poll() is None and time.time() < deadline, "no synthetic series reached the sink"
            time.sleep(0.5)
    finally:
        daemon = run(["pgrep", "-P", str(node.pid)], check=False).stdout.split()  # strace's child
        try:
            for pid in daemon or [str(node.pid)]:
                os.kill(int(pid), signal.SIGTERM)
            out, _ = node.communicate(timeout=120)
        finally:  # a node that does not stop must not outlive the test, nor keep the sink running
            if node.poll() is None:
                for pid in daemon:
                    os.kill(int(pid), signal.SIGKILL)
                node.kill()
                node.communicate()
            sink.terminate()
            sink.wait(timeout=10)
    assert node.returncode == 0, out

    text = trace.read_text(errors="replace")
    used = set(re.findall(r"^\d+\s+(?:<\.\.\. )?([a-z_0-9]+)[( ]", text, flags=re.M)) - {"exit", "resumed"}
    assert {"accept4", "connect", "fsync"} <= used  # the trace saw the SCP, the durable write and the SCU
    allowed = frozenset().union(*(_syscalls(g) if g.startswith("@") else {g}
                                  for g in _unit_value("SystemCallFilter").split()))
    assert sorted(used - allowed) == []
    families = set(re.findall(r"\bsocket\((AF_[A-Z0-9]+)", text))
    assert families and families <= set(_unit_value("RestrictAddressFamilies").split()), families
