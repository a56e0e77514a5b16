"""The sending side against a real DCMTK storescp: no response is ever taken by pynetdicom's reactor.

pynetdicom's association thread (the reactor) polls the DIMSE queue the sender waits on, pausing
itself with a flag it sets just before a wait that may return at once. A C-STORE sent in that
instant has its response taken by the reactor, which drops it as "unexpected", while the sender
waits out the DIMSE timeout (under CPU load this happened in production). The test makes the
scheduling that load causes happen every time: between two instances the sender is busy for a
while (reading the next file, recording progress), the reactor lingers after its racy wait, and
the sender wakes late from its wait for the response, so the response lies on the queue when the
reactor reads it.
"""

from __future__ import annotations

import queue
import threading
import time

import pytest
from pynetdicom.association import Association

from dicomnode import netinternals
from dicomnode.scu import Timeouts, store_files
from tests.support.dicomfactory import make_series
from tests.support.peers import free_port
from tests.test_dispatch import Sink

pytestmark = pytest.mark.integration

WINDOW = 0.3  # seconds the reactor lingers between "paused" and its next read of the queue
LATE_WAKE = 3 * WINDOW  # seconds the sending thread takes to wake when its response has arrived


class _LingeringCheckpoint(threading.Event):
    """The reactor's checkpoint, with the reactor's racy instant stretched to WINDOW: when the
    wait returns at once (the sender has not paused the reactor yet), linger before returning,
    with `_is_paused` still True, as a descheduled reactor thread would."""

    def wait(self, timeout=None):
        was_set = self.is_set()
        result = super().wait(timeout)
        if was_set and threading.current_thread().name != threading.main_thread().name:
            time.sleep(WINDOW)
        return result


class _LateWakingQueue(queue.Queue):
    """The DIMSE message queue, whose blocking reader (the sender) is descheduled for LATE_WAKE."""

    def get(self, block=True, timeout=None):
        if block:
            time.sleep(LATE_WAKE)
        return super().get(block, timeout)


@pytest.fixture
def widened_reactor_window(monkeypatch):
    init = Association.__init__

    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self._reactor_checkpoint = _LingeringCheckpoint()
        self._reactor_checkpoint.set()
        self.dimse.msg_queue = _LateWakingQueue()

    monkeypatch.setattr(Association, "__init__", patched)


def test_no_response_is_stolen_by_the_reactor(tmp_path, widened_reactor_window):
    sink = Sink(tmp_path / "sink", free_port()).start()
    try:
        files = make_series(tmp_path / "in", slices=3, rows=32, cols=32)
        stored: list[str] = []

        def progress(path, ok):
            if ok:
                stored.append(path.name)
            time.sleep(WINDOW / 6)  # busy between instances: the reactor reaches its wait first

        report = store_files(files, "127.0.0.1", sink.port, "SINK", timeout=Timeouts(2, 2, 2, 2), on_progress=progress)
        assert report.ok, f"{len(report.failed)} of 3 not stored, first: {report.failed[0][1]}"
        assert report.stored == 3 and len(stored) == 3 and len(sink.files()) == 3
    finally:
        sink.stop()


def test_the_internals_the_node_relies_on_are_there():
    netinternals.check()  # raises naming the missing internal on a pynetdicom that lacks one


def test_the_sending_socket_has_nagle_off(tmp_path):
    """A C-STORE's last PDU must not wait for the peer's delayed ACK (bench/bench_stow.py)."""
    import socket

    from pynetdicom import AE

    from dicomnode.scu import _associate

    sink = Sink(tmp_path / "sink", free_port()).start()
    try:
        ae = AE("NODE")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = _associate(ae, "127.0.0.1", sink.port, "SINK", None)
        try:
            assert assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        finally:
            assoc.release()
    finally:
        sink.stop()
