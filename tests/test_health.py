"""/healthz and /readyz flip with each condition; systemd's READY/WATCHDOG/STATUS messages come
from the loops' heartbeats, so a stalled loop stops the watchdog pings."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from typing import Iterator

import pytest

from dicomnode.node import Node
from tests.support.doubles import CopyProcessor
from tests.support.nodehelpers import make_config, wait_for
from tests.support.peers import free_port

pytestmark = pytest.mark.integration


def get(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@contextlib.contextmanager
def stall(node: Node, loop: str) -> Iterator[None]:
    """Make one stage loop hang in its step (as a deadlock would) until the block ends; then it
    returns, so the node stops without waiting out the loop's join timeout."""
    release = threading.Event()
    (lp,) = [lp for lp in node._loops if lp.name == loop]
    lp.step = lambda: release.wait() and False
    node.heartbeats.bound = 1.0
    try:
        yield
    finally:
        release.set()


def test_healthz_and_readyz_follow_each_condition(tmp_path, port):
    http = free_port()
    cfg = make_config(tmp_path, port, metrics={"enabled": True, "host": "127.0.0.1", "port": http})
    with Node(cfg, CopyProcessor()) as node:
        code, body = get(http, "/healthz")
        assert code == 200 and {"loop:assembler", "loop:worker", "loop:dispatcher"} <= set(body["checks"])
        code, body = get(http, "/readyz")
        assert code == 200 and body["checks"]["model"]["ok"] and body["checks"]["scp"]["ok"]
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=5) as r:
            assert b"dicomnode_up 1.0" in r.read()

        node.cfg.node.min_free_disk_mb = 10**9  # free disk below the watermark
        code, body = get(http, "/readyz")
        assert code == 503 and not body["checks"]["disk"]["ok"] and body["checks"]["scp"]["ok"]
        node.cfg.node.min_free_disk_mb = 1
        assert get(http, "/readyz")[0] == 200

        os.kill(node.engine.pid, signal.SIGKILL)  # the model is gone until a new inference process is up
        assert wait_for(lambda: get(http, "/readyz")[0] == 503, 5)
        assert "(re)starting" in get(http, "/readyz")[1]["checks"]["model"]["detail"]
        assert wait_for(lambda: get(http, "/readyz")[0] == 200, 30)  # replaced in the background

        node.scp.stop()
        code, body = get(http, "/readyz")
        assert code == 503 and body["checks"]["scp"]["detail"] == "not listening"

        with stall(node, "assembler"):
            assert wait_for(lambda: get(http, "/healthz")[0] == 503, 5)
            code, body = get(http, "/healthz")
            assert not body["checks"]["loop:assembler"]["ok"] and body["checks"]["loop:dispatcher"]["ok"]


def test_the_spool_probe_sees_a_read_only_file_system(tmp_path):
    """What /readyz's spool_writable check uses: a real file creation, which root cannot bypass."""
    from dicomnode.health import writable

    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        assert writable(tmp_path) and not writable(ro)
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


def test_systemd_notify_ready_watchdog_and_a_stalled_loop(tmp_path, port, monkeypatch):
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.1)
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # pings every 0.2 s

    def messages(seconds: float) -> list[str]:
        out, deadline = [], time.time() + seconds
        while time.time() < deadline:
            try:
                out += sock.recv(4096).decode().split("\n")
            except socket.timeout:
                pass
        return out

    try:
        with Node(make_config(tmp_path, port), CopyProcessor()) as node:
            first = messages(1.0)
            assert first[0] == "READY=1" and first[1].startswith("STATUS=0 series arriving, 0 waiting")
            assert first.count("WATCHDOG=1") >= 3
            with stall(node, "dispatcher"):
                messages(1.5)  # what was queued before, and pings until the 1 s heartbeat bound passes
                later = messages(1.0)
                assert "WATCHDOG=1" not in later, later
                assert any(m.startswith("STATUS=unhealthy: loop:dispatcher") for m in later)
                messages(0.3)  # drain, so the next message has room
        assert "STOPPING=1" in messages(0.5)
    finally:
        sock.close()
