"""Shared fixtures: DCMTK binaries, free ports, a node on loopback with a test-double processor."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

DCMTK_DIRS = ("/usr/bin", "/usr/local/bin")


def dcmtk(tool: str) -> str:
    """Path of a DCMTK tool (pynetdicom installs same-named scripts that shadow DCMTK on PATH)."""
    for d in DCMTK_DIRS:
        p = Path(d) / tool
        if p.exists():
            return str(p)
    pytest.skip(f"DCMTK {tool} not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()


def run(cmd: list[str], timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def wait_for_node(proc: subprocess.Popen, port: int, timeout: float = 60, calling_aet: str | None = None) -> None:
    """Poll the node started as `proc` with DCMTK echoscu until it answers (it may be loading a model)."""
    cmd = [dcmtk("echoscu"), *(["-aet", calling_aet] if calling_aet else []), "-aec", "DICOMNODE", "127.0.0.1",
           str(port)]
    deadline = time.time() + timeout
    while run(cmd, check=False).returncode:
        assert proc.poll() is None, "the node exited while starting"
        assert time.time() < deadline, f"the node did not answer C-ECHO within {timeout} s"
        time.sleep(0.2)
