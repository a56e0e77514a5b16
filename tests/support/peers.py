"""Helpers for tests that talk to real peers: DCMTK's binaries, free loopback ports, commands."""

from __future__ import annotations

import random
import socket
import subprocess
import time
from pathlib import Path

import pytest

DCMTK_DIRS = ("/usr/bin", "/usr/local/bin")


def dcmtk(tool: str) -> str:
    """Path of a DCMTK tool (pynetdicom installs same-named scripts that shadow DCMTK on PATH)."""
    for d in DCMTK_DIRS:
        p = Path(d) / tool
        if p.exists():
            return str(p)
    pytest.skip(f"DCMTK {tool} not installed")


_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port free now, below the kernel's ephemeral range when there is room: a port
    from that range can be taken as the source port of any outgoing connection (a DCMTK echo,
    a C-STORE) between this check and the server's bind. Never the same port twice per session."""
    low = int(_EPHEMERAL.read_text().split()[0]) if _EPHEMERAL.exists() else 32768
    rng = random.Random()
    for _ in range(200):
        candidate = rng.randint(10000, low - 1) if low > 11000 else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            chosen = s.getsockname()[1]
        if chosen not in _handed_out:
            _handed_out.add(chosen)
            return chosen
    raise RuntimeError("no free loopback port found")


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
