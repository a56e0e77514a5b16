"""Logging for a daemon that strangers can talk to: lines they can provoke are rate-limited."""

from __future__ import annotations

import logging
import threading
import time


class RateLimit(logging.Filter):
    """At most `burst` records per message template per `window` seconds; when a window closes
    with records dropped, the next record that passes says how many were dropped."""

    def __init__(self, burst: int = 20, window: float = 60.0):
        super().__init__()
        self.burst, self.window = burst, window
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], list[float | int]] = {}  # key -> [window start, passed, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg)[:200])
        now = time.monotonic()
        with self._lock:
            if len(self._seen) > 4096:
                self._seen.clear()
            entry = self._seen.setdefault(key, [now, 0, 0])
            if now - entry[0] >= self.window:
                dropped = entry[2]
                entry[:] = [now, 0, 0]
                if dropped:
                    record.msg = f"{record.msg} [{dropped} similar line(s) suppressed in the last {self.window:g} s]"
            if entry[1] >= self.burst:
                entry[2] += 1
                return False
            entry[1] += 1
        return True
