"""Logging for a daemon that strangers can talk to: lines they can provoke are rate-limited."""

from __future__ import annotations

import logging
import re
import threading
import time

_VALUES = re.compile(r"'[^']*'|\"[^\"]*\"|0x[0-9A-Fa-f]+|\d+")


def _shape(message: str) -> str:
    """A message with its quoted values and numbers taken out: libraries that format values into
    the message itself (pynetdicom's "Unknown PDU type received '0x4a'") still share one key."""
    return _VALUES.sub("#", message)


class RateLimit(logging.Filter):
    """At most `burst` records per message template per `window` seconds; when a window closes
    with records dropped, the next record that passes says how many were dropped."""

    def __init__(self, burst: int = 20, window: float = 60.0):
        super().__init__()
        self.burst, self.window = burst, window
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], list[float | int]] = {}  # key -> [window start, passed, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, _shape(str(record.msg)[:200]))
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


LINE_LIMIT = 500  # characters of a log message, after escaping


def printable(value: object, limit: int = LINE_LIMIT) -> str:
    """Text fit for one log line: non-ASCII and control characters escaped, cut at `limit`."""
    text = str(value).encode("ascii", "backslashreplace").decode("ascii")
    text = text.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


class OneLine(logging.Filter):
    """Every record becomes one escaped line of at most LINE_LIMIT characters, whoever logs it
    (pynetdicom logs values from the wire, up to whole PDUs). An exception logged by a library
    becomes a clause of that line; the node's own exceptions keep their traceback (a bug of the
    node is worth its traceback; a stranger's malformed PDU is not)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception as exc:  # a record whose arguments do not fit its template
            text = f"{record.msg!r} (unformattable: {type(exc).__name__})"
        if record.exc_info and record.exc_info[1] is not None and not record.name.startswith("dicomnode"):
            logged = record.exc_info[1]
            text = f"{text} ({type(logged).__name__}: {logged})"
            record.exc_info, record.exc_text = None, None
        record.msg, record.args = printable(text), None
        return True


def thread_excepthook(args: threading.ExceptHookArgs) -> None:
    """An exception that ends a thread (pynetdicom's association and DUL threads die on some
    malformed PDUs) is one warning line, not a traceback on stderr."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("dicomnode.threads").warning("thread %s ended by %s: %s", name, args.exc_type.__name__,
                                                   args.exc_value)


def configure(level: str, stream=None) -> logging.Handler:
    """The daemon's logging: one handler on the root logger, with the rate limit and the one-line
    filter, pynetdicom and apscheduler at WARNING, and thread exceptions logged. Returns the handler."""
    import sys

    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RateLimit())  # keyed by message template: before the template is filled in
    handler.addFilter(OneLine())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    threading.excepthook = thread_excepthook
    return handler
