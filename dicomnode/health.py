"""Liveness, readiness and systemd notification, from the node's own heartbeats.

- `/healthz` (liveness): every stage loop has beaten within `HEARTBEAT_BOUND` seconds. A loop
  beats on every turn, and the process stage also while it waits for the inference process.
- `/readyz` (readiness): the model is loaded in the inference process, the spool is writable,
  free disk is above the watermark and the SCP is listening.
- systemd (`Type=notify`): READY=1 once the node listens with its model loaded; WATCHDOG=1 only
  while /healthz would say healthy, so a stalled loop gets the service restarted; STATUS= with
  a one-line summary. The protocol is a datagram on $NOTIFY_SOCKET (sd_notify(3)).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger("dicomnode.health")

HEARTBEAT_BOUND = 30.0  # seconds a loop may go without beating before the node counts as unhealthy


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def body(self) -> bytes:
        return json.dumps({"ok": self.ok, "checks": {c.name: {"ok": c.ok, "detail": c.detail}
                                                      for c in self.checks}}, indent=1).encode() + b"\n"


def writable(folder) -> bool:
    """Whether a file can be created in `folder` now (a real probe: root ignores permission bits)."""
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            return True
    except OSError:
        return False


class Heartbeats:
    """Last beat per loop (monotonic seconds)."""

    def __init__(self, bound: float = HEARTBEAT_BOUND):
        self.bound = bound
        self._beats: dict[str, float] = {}
        self._lock = threading.Lock()

    def beat(self, name: str) -> None:
        with self._lock:
            self._beats[name] = time.monotonic()

    def report(self) -> Report:
        now = time.monotonic()
        with self._lock:
            beats = dict(self._beats)
        return Report([Check(f"loop:{name}", now - at <= self.bound, f"last beat {now - at:.1f} s ago")
                       for name, at in sorted(beats.items())])


class HttpEndpoints:
    """/metrics, /healthz and /readyz on one port (the `[metrics]` one)."""

    def __init__(self, host: str, port: int, registry, health: Callable[[], Report], ready: Callable[[], Report]):
        endpoints = {"/healthz": health, "/readyz": ready}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0]
                if path in endpoints:
                    report = endpoints[path]()
                    self._send(200 if report.ok else 503, "application/json", report.body())
                elif path in ("/metrics", "/"):
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
                else:
                    self._send(404, "text/plain", b"not found: /metrics, /healthz or /readyz\n")

            def _send(self, code: int, ctype: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # scrapes every few seconds: not worth a log line
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="dicomnode-http", daemon=True)

    def start(self) -> "HttpEndpoints":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class SystemdNotifier:
    """sd_notify over $NOTIFY_SOCKET; does nothing when not started by systemd with Type=notify."""

    def __init__(self, environ=os.environ):
        address = environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = environ.get("WATCHDOG_USEC", "")
        self.watchdog_interval = int(usec) / 1e6 / 2 if usec.isdigit() and int(usec) > 0 else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *lines: str) -> None:
        if not self.enabled:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.setblocking(False)  # never let a slow reader block the node: drop the message instead
                s.sendto("\n".join(lines).encode(), self.address)
        except BlockingIOError:
            log.debug("systemd's notify socket is full; message dropped")
        except OSError as exc:
            log.warning("cannot notify systemd: %s", exc)

    def start_watchdog(self, healthy: Callable[[], Report], status: Callable[[], str]) -> None:
        """Ping WATCHDOG=1 every WATCHDOG_USEC/2, but only while `healthy()` says so."""
        if not self.enabled or self.watchdog_interval is None:
            return

        def run() -> None:
            while not self._stop.wait(self.watchdog_interval):
                report = healthy()
                if report.ok:
                    self.send("WATCHDOG=1", f"STATUS={status()}")
                else:
                    failing = ", ".join(c.name for c in report.checks if not c.ok)
                    log.error("not pinging the systemd watchdog: %s", failing)
                    self.send(f"STATUS=unhealthy: {failing}")

        self._thread = threading.Thread(target=run, name="dicomnode-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.send("STOPPING=1")
