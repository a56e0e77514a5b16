"""The pynetdicom internals the node relies on, in one place, checked when the node starts.

pynetdicom's public API does not cover three things the node needs:

- the DUL thread's polling delay (`DULServiceProvider._run_loop_delay`) and its idle timer
  (`_idle_timer`, a `Timer` with `timeout` and `remaining`): the listener paces polling by them;
  and the DUL's queue to the association (`to_user_queue`): the listener ends the thread of a
  connection whose peer closed before its A-ASSOCIATE-RQ (`listener.end_abandoned`);
- the association reactor's pause (`Association._reactor_checkpoint`, `_is_paused`) and the DIMSE
  message queue (`DIMSEServiceProvider.get_msg`, `msg_queue`): the sending side takes the reactor
  off that queue (`keep_responses_for_sender`);
- the connected socket of a requestor association (`dul.socket.socket`): the sending side turns
  Nagle's algorithm off on it (`no_delay`), as DCMTK does with TCP_NODELAY=1.

pyproject.toml pins pynetdicom to the minor release these were tested with; `check()` says clearly
which one is missing if a later release renames it, instead of failing mid-transfer.
"""

from __future__ import annotations

from typing import Any

TESTED = "3.0"  # the pynetdicom minor release these internals were read from and tested with


class PynetdicomIncompatible(RuntimeError):
    """The installed pynetdicom lacks an internal the node relies on."""


def check() -> None:
    """Raise PynetdicomIncompatible naming the first missing internal."""
    import pynetdicom
    from pynetdicom import AE
    from pynetdicom.association import Association

    assoc = Association(AE(), "requestor")
    needs: list[tuple[Any, str, str]] = [
        (assoc.dul, "_run_loop_delay", "DULServiceProvider._run_loop_delay"),
        (assoc.dul, "_idle_timer", "DULServiceProvider._idle_timer"),
        (getattr(assoc.dul, "_idle_timer", None), "remaining", "Timer.remaining"),
        (getattr(assoc.dul, "_idle_timer", None), "timeout", "Timer.timeout"),
        (assoc, "_reactor_checkpoint", "Association._reactor_checkpoint"),
        (assoc, "_is_paused", "Association._is_paused"),
        (assoc.dul, "to_user_queue", "DULServiceProvider.to_user_queue"),
        (assoc.dimse, "msg_queue", "DIMSEServiceProvider.msg_queue"),
        (assoc.dimse, "get_msg", "DIMSEServiceProvider.get_msg"),
    ]
    for obj, attr, name in needs:
        if obj is None or not hasattr(obj, attr):
            raise PynetdicomIncompatible(
                f"pynetdicom {pynetdicom.__version__} has no {name}, which dicomnode relies on (tested with "
                f"pynetdicom {TESTED}.x): install the version pyproject.toml names, e.g. pip install 'pynetdicom=={TESTED}.*'")


def keep_responses_for_sender(assoc) -> None:
    """Let only the sending thread take messages off a requestor association's DIMSE queue.

    pynetdicom's association thread (the reactor) polls that queue to serve incoming requests,
    and pauses while `send_c_store` waits for its response. The pause is not airtight: the
    reactor sets `_is_paused` just before it waits on `_reactor_checkpoint`; when the checkpoint
    is still set, the wait returns at once, and a sender that clears the checkpoint in that
    instant sees `_is_paused`, sends its request, and the reactor's next non-blocking
    `get_msg()` takes the C-STORE-RSP off the queue, drops it as "unexpected" and the sender
    waits out the DIMSE timeout. Under CPU load that instant is wide enough to hit.

    An association the node opens as a storage (or verification) SCU never serves requests: the
    only messages it may receive are responses to its own requests. So the reactor's
    non-blocking reads get nothing, and the queue has one reader, the sender's blocking read.
    The reactor still watches for release, abort, a dead DUL and the network timeout; and an
    abort still reaches the sender, whose blocking read returns the (None, None) the state
    machine queues for it."""
    dimse = assoc.dimse
    blocking_get = dimse.get_msg

    def sender_only_get_msg(block: bool = False):
        return blocking_get(block=True) if block else (None, None)

    dimse.get_msg = sender_only_get_msg


def no_delay(assoc) -> None:
    """TCP_NODELAY on an established association's socket: a C-STORE's last PDU goes out at once
    instead of waiting for the peer's delayed ACK (bench/bench_stow.py: 0.34 -> 0.21 s for 15
    images of 768 KiB to an Orthanc with TCP_NODELAY=1). Without the internal, nothing changes."""
    import socket

    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # not TCP, or already closed: nothing to tune
            pass
