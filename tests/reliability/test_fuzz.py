"""A PDU fuzzer (random bytes, truncated, wrong-type, absurd-length and slow PDUs) while a good
sender on 127.0.0.1 keeps sending: every one of the good sender's associations must succeed, also
when the fuzzer shares its address (NAT, the same host), and nothing the fuzzer sends is stored.
The node logs as `serve` does: no traceback, no line longer than the limit. Seeded;
DICOMNODE_RELIABILITY=long sends more."""

from __future__ import annotations

import io
import logging
import os
import random
import socket
import struct
import threading
import time

import pytest

from dicomnode import logs
from dicomnode.node import Node
from tests.support.dicomfactory import make_series
from tests.support.nodehelpers import make_config
from tests.support.peers import dcmtk, run

pytestmark = pytest.mark.integration

CASES = 2000 if os.environ.get("DICOMNODE_RELIABILITY") == "long" else 300


def associate_rq(called: bytes = b"DICOMNODE", calling: bytes = b"FUZZ") -> bytes:
    """A plausible A-ASSOCIATE-RQ (verification context), for the fuzzer to damage."""
    app = b"\x10\x00" + struct.pack(">H", 21) + b"1.2.840.10008.3.1.1.1"
    abstract = b"\x30\x00" + struct.pack(">H", 17) + b"1.2.840.10008.1.1"
    transfer = b"\x40\x00" + struct.pack(">H", 17) + b"1.2.840.10008.1.2"
    ctx_body = b"\x01\x00\x00\x00" + abstract + transfer
    ctx = b"\x20\x00" + struct.pack(">H", len(ctx_body)) + ctx_body
    max_len = b"\x51\x00\x00\x04" + struct.pack(">I", 16384)
    user = b"\x50\x00" + struct.pack(">H", len(max_len)) + max_len
    body = struct.pack(">HH", 1, 0) + called.ljust(16) + calling.ljust(16) + b"\0" * 32 + app + ctx + user
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def fuzz_case(rng: random.Random) -> tuple[bytes, float]:
    """Bytes to send and how slowly (seconds between bytes, 0 for at once)."""
    good = associate_rq()
    kind = rng.choice(["random", "truncated", "wrong-type", "absurd-length", "flipped", "slow", "garbage-after"])
    if kind == "random":
        return rng.randbytes(rng.randint(1, 300)), 0.0
    if kind == "truncated":
        return good[:rng.randint(1, len(good) - 1)], 0.0
    if kind == "wrong-type":
        return bytes([rng.choice([0x00, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0xFF])]) + good[1:], 0.0
    if kind == "absurd-length":
        return good[:2] + struct.pack(">I", rng.choice([0xFFFFFFFF, 0x7FFFFFFF, 2**24])) + good[6:], 0.0
    if kind == "flipped":
        data = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data), 0.0
    if kind == "slow":
        return good[:rng.randint(5, 40)], 0.02
    return good + rng.randbytes(rng.randint(1, 100)), 0.0


def fuzz(port: int, cases: int, seed: int, stop: threading.Event, source: str) -> int:
    rng, sent = random.Random(seed), 0
    for _ in range(cases):
        if stop.is_set():
            break
        data, pause = fuzz_case(rng)
        with socket.socket() as s:
            s.settimeout(2)
            s.bind((source, 0))
            try:
                s.connect(("127.0.0.1", port))
                if pause:
                    for b in data:
                        s.send(bytes([b]))
                        time.sleep(pause)
                else:
                    s.sendall(data)
                s.settimeout(0.3)  # read what the node answers, if anything; no need to wait for its deadline
                s.recv(64)
            except OSError:
                pass
        sent += 1
    return sent


@pytest.fixture
def daemon_log():
    """The log as `serve` writes it (dicomnode.logs.configure), into a buffer."""
    buf = io.StringIO()
    hook, level = threading.excepthook, logging.getLogger().level
    handler = logs.configure("INFO", stream=buf)
    yield buf
    logging.getLogger().removeHandler(handler)
    logging.getLogger().setLevel(level)
    threading.excepthook = hook


@pytest.mark.parametrize("fuzzer", ["127.0.0.2", "127.0.0.1"], ids=["other-host", "same-host"])
def test_a_good_sender_is_never_refused_during_fuzzing(tmp_path, port, fuzzer, daemon_log):
    files = make_series(tmp_path / "in", slices=4)
    stop = threading.Event()
    with Node(make_config(tmp_path, port, node={"max_associations": 4})) as node:
        rss_before = rss_mb()
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("sent", fuzz(port, CASES, 12, stop, fuzzer)), daemon=True)
        t.start()
        good = []
        while t.is_alive():
            r = run([dcmtk("storescu"), "-to", "10", "-aec", "DICOMNODE", "127.0.0.1", str(port), *map(str, files)],
                    check=False)
            good.append(r.returncode == 0)
        stop.set()
        t.join(30)
        assert result["sent"] == CASES
        assert len(good) >= 3 and all(good), f"{good.count(False)} of {len(good)} good associations failed"
        assert node.journal.instance_count() == 4  # the good series; nothing of the fuzzer's
        deadline = time.time() + 10
        while node.scp._server.pending() and time.time() < deadline:
            time.sleep(0.2)
        assert node.scp._server.pending() == 0  # nothing the fuzzer opened outlives the request deadline
        from dicomnode.infer import heap

        heap.trim()  # what the node does every minute
        rss_after = rss_mb()
    lines = daemon_log.getvalue().splitlines()
    longest = max(map(len, lines), default=0)
    tracebacks = sum(line.startswith("Traceback") for line in lines)
    print(f"{CASES} fuzz cases from {fuzzer}; good sender: {good.count(True)} of {len(good)} associations "
          f"succeeded; log: {len(lines)} lines, longest {longest} chars, {tracebacks} tracebacks; "
          f"RSS of the process holding the node {rss_before:.0f} -> {rss_after:.0f} MB")
    assert rss_after - rss_before < 100
    assert tracebacks == 0 and longest <= logs.LINE_LIMIT + 120  # the limit, plus time, level and logger name


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0
