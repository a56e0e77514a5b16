"""Regression tests for the lock-outs a stranger could cause (issue: reliability and security).

The attacker connects from 127.0.0.2 and the hospital's sender from 127.0.0.1 (both loopback),
so per-host limits are exercised as they would be between two machines.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from dicomnode.node import Node
from tests.support.dicomfactory import make_series
from tests.support.nodehelpers import make_config
from tests.support.peers import dcmtk, run
from tests.test_scp import make_certs

pytestmark = pytest.mark.integration

ATTACKER = "127.0.0.2"


def truncated_associate_rq() -> bytes:
    """The first 40 bytes of an A-ASSOCIATE-RQ that declares 500 bytes."""
    body = struct.pack(">HH", 1, 0) + b"DICOMNODE".ljust(16) + b"EVIL".ljust(16)
    return struct.pack(">BBI", 0x01, 0x00, 500) + body[:34]


def attack(port: int, n: int, close: bool) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.settimeout(2)
        s.bind((ATTACKER, 0))
        try:
            s.connect(("127.0.0.1", port))
            s.sendall(truncated_associate_rq())
        except OSError:
            pass  # refused or closed by the node: that is the point
        if close:
            s.close()
        else:
            socks.append(s)
    return socks


def echo(port: int, extra=()) -> bool:
    return run([dcmtk("echoscu"), "-to", "5", *extra, "-aec", "DICOMNODE", "127.0.0.1", str(port)],
               check=False).returncode == 0


@pytest.mark.parametrize("close", [True, False], ids=["closed", "held-open"])
def test_truncated_association_requests_do_not_lock_the_sender_out(tmp_path, port, close):
    files = make_series(tmp_path / "in", slices=3)
    with Node(make_config(tmp_path, port, node={"max_associations": 4, "max_pending_per_host": 4})) as node:
        held = attack(port, 12, close)  # more than max_associations, repeatable at will
        try:
            t0 = time.time()
            assert echo(port), "the sender was locked out"
            run([dcmtk("storescu"), "-to", "5", "-aec", "DICOMNODE", "127.0.0.1", str(port), *map(str, files)])
            assert time.time() - t0 < 10
            assert node.scp._server.pending(ATTACKER) <= 4
        finally:
            for s in held:
                s.close()
        deadline = time.time() + 10  # the request deadline (5 s) ends what the attacker left
        while node.scp._server.pending() and time.time() < deadline:
            time.sleep(0.2)
        assert node.scp._server.pending() == 0


def test_a_continuous_attack_while_a_sender_works(tmp_path, port):
    stop = threading.Event()
    with Node(make_config(tmp_path, port, node={"max_associations": 4, "max_pending_per_host": 4})):
        def loop():
            while not stop.is_set():
                attack(port, 6, close=True)
        t = threading.Thread(target=loop, daemon=True)
        t.start()
        try:
            results = [echo(port) for _ in range(10)]
        finally:
            stop.set()
            t.join(10)
    assert all(results), results


def test_an_idle_tcp_connection_does_not_block_tls(tmp_path, port):
    certs = make_certs(tmp_path / "pki")
    cfg = make_config(tmp_path, port, tls={"enabled": True, "cert_file": str(certs["server.crt"]),
                                           "key_file": str(certs["server.key"])})
    with Node(cfg) as node:
        idle = socket.create_connection(("127.0.0.1", port))  # never starts the handshake
        try:
            t0 = time.time()
            assert echo(port, ["+tla", "+cf", str(certs["ca.crt"])])
            assert time.time() - t0 < 5
        finally:
            idle.close()
        assert node.scp._server.pending() <= 1


def test_bursts_of_connections_fit_the_backlog(tmp_path, port):
    with Node(make_config(tmp_path, port)):
        socks, failures = [], 0
        for _ in range(60):  # connect() completes once the kernel has queued the connection
            s = socket.socket()
            s.settimeout(3)
            s.bind((ATTACKER, 0))
            try:
                s.connect(("127.0.0.1", port))
            except OSError:
                failures += 1
            socks.append(s)
        for s in socks:
            s.close()
        assert failures == 0
        assert echo(port)
