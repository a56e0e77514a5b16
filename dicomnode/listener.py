"""The listening socket, hardened against strangers (used by `receive.StoreSCP`).

pynetdicom's server accepts a connection, wraps TLS in its accept loop and gives every
connection an association thread that waits `acse_timeout` (30 s) for the A-ASSOCIATE-RQ; those
waiting threads count against `max_associations`. So a dozen half-open connections lock every
sender out, and one idle TCP connection stalls the accept loop while TLS waits for its handshake.
This server instead:

- checks `allowed_hosts` when the connection is accepted, and closes it before any thread exists;
- caps connections that have not yet sent their A-ASSOCIATE-RQ, per host and in total; one the
  peer has closed stops counting at once (pynetdicom's thread for it lingers until its deadline),
  so a broken client cannot starve a good sender that shares its address (NAT, one host);
- gives the A-ASSOCIATE-RQ (and the TLS handshake, done in the connection's own thread) a short
  deadline of its own (`request_timeout`), separate from `acse_timeout`;
- counts only associations that have sent their request against `max_associations`;
- listens with a backlog of 128 instead of 5;
- copies the ~170 supported presentation contexts for each association without re-validating
  7,600 transfer syntax UIDs (pynetdicom deep-copies them: ~30 ms of CPU per association);
- paces pynetdicom's polling: its DUL thread sleeps `_run_loop_delay` (1 ms) whenever the socket
  has nothing, and a C-STORE exchange passes that sleep twice (the response going out, the next
  request coming in), which is most of pynetdicom's own per-instance time. While a single
  association transfers, its DUL polls every POLL_ACTIVE instead; with several at once the delay
  grows back towards POLL_IDLE (see `pace`), and an association quiet for ACTIVE_WINDOW returns to
  POLL_IDLE (pynetdicom's 1 ms), so idle associations cost no more CPU than before.
"""

from __future__ import annotations

import copy
import ipaddress
import logging
import select
import socket
import ssl
import threading
import time
import weakref
from typing import Sequence

from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

log = logging.getLogger("dicomnode.listener")

LISTEN_BACKLOG = 128
REFUSAL_LOG_INTERVAL = 10.0  # seconds between two log lines about refused connections from one host
POLL_ACTIVE = 0.0001  # s between DUL polls while an association is transferring (bench/bench_receive.py)
POLL_IDLE = 0.001  # pynetdicom's default
ACTIVE_WINDOW = 0.5  # s since the last PDU during which an association counts as transferring
PACE_INTERVAL = 0.1  # s between two looks at the associations' activity
MAX_UNREQUESTED = 64  # open connections without an A-ASSOCIATE-RQ, in all; as many closed ones being ended


class _Handler(RequestHandler):
    """Creates the association with the short request deadline; `on_requested` restores acse_timeout."""

    server: GuardedAssociationServer

    def _create_association(self):
        assoc = super()._create_association()
        assoc.acse_timeout = self.server.request_timeout
        assoc.dul._run_loop_delay = POLL_ACTIVE  # negotiation is a burst of PDUs too
        self.server.track(self.client_address, assoc)
        return assoc


class _Contexts(list):
    """The server's presentation contexts. pynetdicom deep-copies them for every association;
    their UIDs are immutable strings, so each context needs only its own list of them."""

    def __deepcopy__(self, memo) -> list:
        out = []
        for cx in self:
            dup = copy.copy(cx)
            dup._transfer_syntax = list(cx._transfer_syntax)
            out.append(dup)
        return out


class GuardedAssociationServer(ThreadedAssociationServer):
    request_queue_size = LISTEN_BACKLOG
    daemon_threads = True

    def __init__(self, ae, address, ae_title, contexts, ssl_context=None, evt_handlers=None, *,
                 allowed_networks: Sequence = (), request_timeout: float = 5.0, max_pending_per_host: int = 4,
                 max_pending: int = MAX_UNREQUESTED):
        self.allowed_networks = list(allowed_networks)
        self.request_timeout = request_timeout
        self.max_pending_per_host = max_pending_per_host
        self.max_pending = max_pending
        self._tls_context = ssl_context  # negotiated per connection, off the accept loop
        self._lock = threading.Lock()
        # (host, port) -> [accepted at, association or None until its thread has created it, socket]
        self._connections: dict[tuple, list] = {}
        self._last_refusal_log: dict[str, float] = {}
        self._stopping = threading.Event()
        super().__init__(ae, address, ae_title, contexts, None, evt_handlers=evt_handlers, request_handler=_Handler)
        self.contexts = _Contexts(self.contexts)
        threading.Thread(target=self._pace_loop, name="dicomnode-pace", daemon=True).start()

    def shutdown(self) -> None:
        self._stopping.set()
        super().shutdown()

    # -- polling pace --------------------------------------------------------------------------
    def _pace_loop(self) -> None:
        while not self._stopping.wait(PACE_INTERVAL):
            self.pace()
            self.end_abandoned()

    def pace(self) -> None:
        """Set each association's DUL polling delay. An association that received a PDU within
        ACTIVE_WINDOW (pynetdicom restarts the DUL's idle timer on every PDU) is transferring.
        One transfer alone is bound by polling latency: POLL_ACTIVE. Several at once are bound by
        the GIL, and every early wake-up takes it from a thread with work: the delay grows with
        the square of their number up to POLL_IDLE (bench/bench_receive.py; docs/experiments/node-performance.md).
        Idle associations poll at POLL_IDLE, pynetdicom's own default."""
        live = [a for _, a in self._live() if a is not None]
        active = []
        for assoc in live:
            timer = assoc.dul._idle_timer
            if (timer.timeout or 0.0) - timer.remaining < ACTIVE_WINDOW:
                active.append(assoc)
        fast = min(POLL_IDLE, POLL_ACTIVE * len(active) ** 2)
        for assoc in live:
            assoc.dul._run_loop_delay = fast if assoc in active else POLL_IDLE

    # -- bookkeeping -------------------------------------------------------------------------
    def track(self, client_address: tuple, assoc) -> None:
        with self._lock:
            entry = self._connections.get(tuple(client_address[:2]))
            if entry is not None:
                entry[1] = weakref.ref(assoc)

    def end_abandoned(self, host: str | None = None) -> int:
        """End the association threads of connections (of one host, or all) whose peer closed
        before sending its A-ASSOCIATE-RQ. pynetdicom's thread would wait out its request deadline
        for a PDU that cannot come, and those threads count against pynetdicom's own association
        limit: a stranger connecting and closing fast would soon have every sender rejected.
        Returns how many were ended."""
        ended = 0
        for h, assoc, sock in self._live(with_sockets=True):
            if assoc is None or assoc.requestor.primitive is not None or host not in (None, h):
                continue
            if getattr(assoc, "_dicomnode_abandoned", False) or not _peer_closed(assoc, sock):
                continue
            assoc._dicomnode_abandoned = True
            assoc.dul.to_user_queue.put(None)  # the thread's wait for the request returns "nothing came"
            ended += 1
        return ended

    def _live(self, *, with_sockets: bool = False) -> list[tuple]:
        """(host, association or None) of every connection that is still open or being set up
        (with `with_sockets`, (host, association or None, accepted socket))."""
        now, out = time.monotonic(), []
        with self._lock:
            for key, (accepted, ref, sock) in list(self._connections.items()):
                assoc = ref() if ref is not None else None
                # tracked before pynetdicom starts its thread: not started yet is alive too
                if assoc is not None and (assoc.is_alive() or assoc.ident is None):
                    out.append((key[0], assoc, sock))
                elif ref is None and now - accepted < self.request_timeout + 5:
                    out.append((key[0], None, sock))  # accepted; its thread has not created the association yet
                else:
                    del self._connections[key]
        return out if with_sockets else [(host, assoc) for host, assoc, _ in out]

    def unrequested(self, host: str | None = None) -> tuple[int, int, int, int]:
        """Connections that have not sent their A-ASSOCIATE-RQ, in one pass: (open ones of `host`,
        closed ones of `host` whose thread has not ended yet, open ones in all, closed ones in all)."""
        counts = [0, 0, 0, 0]
        for h, a, sock in self._live(with_sockets=True):
            if a is None or a.requestor.primitive is None:
                closed = _peer_closed(a, sock)
                counts[2 + closed] += 1
                if h == host:
                    counts[closed] += 1
        return counts[0], counts[1], counts[2], counts[3]

    def pending(self, host: str | None = None) -> int:
        """Connections that have not sent their A-ASSOCIATE-RQ yet (of one host, or all), and
        that the peer has not closed."""
        host_open, _, all_open, _ = self.unrequested(host)
        return all_open if host is None else host_open

    def requested(self) -> int:
        """Associations that have sent their request (negotiating or established)."""
        return sum(1 for _, a in self._live() if a is not None and a.requestor.primitive is not None)

    # -- the accept loop -----------------------------------------------------------------------
    def get_request(self):
        sock = self.socket
        if sock is None:
            raise OSError("the server is closed")
        return sock.accept()  # TLS is negotiated later, in the connection's own thread

    def verify_request(self, request, client_address) -> bool:
        host = client_address[0]
        self.end_abandoned(host)
        why = None
        if self.allowed_networks and not _allowed(host, self.allowed_networks):
            why = "not in allowed_hosts"
        else:
            # Open connections without a request are capped per host and in all; so are closed ones
            # whose thread is still being ended (they count against pynetdicom's association limit:
            # a host that connects and closes faster than that would otherwise fill it). A closed
            # connection does not count against the open ones: a good sender that shares its
            # address with a broken client is not refused for the client's closed connections.
            host_open, host_closed, all_open, all_closed = self.unrequested(host)
            if host_open >= self.max_pending_per_host:
                why = f"{self.max_pending_per_host} connections from this host have not sent an A-ASSOCIATE-RQ yet"
            elif host_closed >= self.max_pending_per_host:
                why = f"{self.max_pending_per_host} connections from this host closed before their A-ASSOCIATE-RQ"
            elif all_open >= self.max_pending or all_closed >= self.max_pending:
                why = f"{self.max_pending} connections have not sent an A-ASSOCIATE-RQ yet"
        if why is None:
            with self._lock:
                self._connections[tuple(client_address[:2])] = [time.monotonic(), None, request]
            return True
        now = time.monotonic()
        if now - self._last_refusal_log.get(host, 0.0) >= REFUSAL_LOG_INTERVAL:
            self._last_refusal_log[host] = now
            if len(self._last_refusal_log) > 1024:
                self._last_refusal_log.clear()
            log.warning("closing connection from %s: %s", host, why)
        return False  # socketserver closes the socket

    def handle_error(self, request, client_address) -> None:
        """socketserver prints a traceback to stderr for an exception while a connection is set
        up; a stranger's malformed bytes get one log line instead (the log's limits apply)."""
        import sys

        exc = sys.exc_info()[1]
        log.warning("connection from %s ended by %s: %s", client_address[0], type(exc).__name__, exc)

    def process_request_thread(self, request, client_address) -> None:
        if self._tls_context is not None:
            try:
                request.settimeout(self.request_timeout)
                request = self._tls_context.wrap_socket(request, server_side=True)
                request.settimeout(None)
            except (ssl.SSLError, OSError) as exc:
                log.warning("TLS handshake with %s failed: %s", client_address[0], str(exc)[:120])
                _close(request)
                with self._lock:
                    self._connections.pop(tuple(client_address[:2]), None)
                return
        super().process_request_thread(request, client_address)


def _allowed(host: str, networks: list) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(ip in net for net in networks)


_HANGUP = select.POLLHUP | select.POLLERR | select.POLLNVAL | getattr(select, "POLLRDHUP", 0)


def _peer_closed(assoc, accepted: socket.socket) -> bool:
    """Whether the peer has closed (or reset) the connection, even with bytes still unread: the
    kernel says so at once (POLLRDHUP), while pynetdicom's thread notices only at its deadline.
    The accepted socket is the one to ask, unless TLS has wrapped it (its descriptor moved)."""
    sock = accepted
    if sock.fileno() < 0 and assoc is not None:
        wrapped = getattr(assoc.dul.socket, "socket", None)
        sock = wrapped if wrapped is not None else sock
    fd = sock.fileno()
    if fd < 0:
        return True  # closed on this side
    poller = select.poll()
    poller.register(fd, _HANGUP)
    return bool(poller.poll(0))


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def start_server(ae, address, *, evt_handlers, ssl_context, allowed_networks, request_timeout: float,
                 max_pending_per_host: int) -> GuardedAssociationServer:
    """Like `AE.start_server(block=False)`, with the guarded server."""
    server = ae.make_server(address, ssl_context=ssl_context, evt_handlers=evt_handlers,
                            server_class=GuardedAssociationServer, allowed_networks=allowed_networks,
                            request_timeout=request_timeout, max_pending_per_host=max_pending_per_host)
    thread = threading.Thread(target=server.serve_forever, name="dicomnode-accept", daemon=True)
    thread.start()
    ae._servers.append(server)  # so AE.shutdown() and server.shutdown() find it, as start_server does
    return server
