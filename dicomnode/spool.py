"""Durable files: what the node acknowledges is on disk before it says so.

Every write goes to a temporary file in the target folder, is fsynced, atomically renamed over
the final name and the folder is fsynced, so a crash leaves either the old file or the new one,
never a torn one. Paths are built only from validated UIDs (digits and dots), so nothing a
peer sends can escape the spool.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import struct
import threading
from pathlib import Path
from typing import Iterable, Iterator

from pydicom import Dataset

UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")


class InvalidUID(ValueError):
    pass


def check_uid(uid: object, what: str) -> str:
    """Return `uid` as a str if it is a syntactically safe DICOM UID, else raise InvalidUID."""
    text = str(uid or "").strip().rstrip("\x00")
    if not text:
        raise InvalidUID(f"{what} is missing or empty")
    if len(text) > 64:
        raise InvalidUID(f"{what} is not a valid UID: {len(text)} characters, at most 64 allowed")
    if not UID_RE.fullmatch(text):  # the value is not logged: a name typed into a UID field is PHI
        raise InvalidUID(f"{what} is not a valid UID: it is not digits separated by dots")
    return text


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: Path) -> None:
    """mkdir -p, fsyncing the parent of every folder it creates, so new folders survive a crash."""
    if path.is_dir():
        return
    ensure_dir(path.parent)
    try:
        path.mkdir()
    except FileExistsError:
        return
    fsync_dir(path.parent)


def write_atomic(path: Path, chunks: Iterable[bytes], *, uncache: bool = False) -> int:
    """Write `chunks` to `path` durably (temp file, fsync, rename, directory fsync); return size.

    `uncache`: once synced, drop the file's pages from the page cache (POSIX_FADV_DONTNEED). The
    received instances are written once and read once, later, by the selection and processing
    stages; giving their clean pages back lets the next write reuse them instead of faulting in
    fresh ones, which on the benchmark VM made the 512 KB write 0.5-1 ms instead of ~0.1 ms
    (docs/experiments/node-performance.md).

    The temporary name is the target's plus the writing thread's id (no random name to draw: two
    threads never share one, and a crash leaves a `.tmp-` file for `Spool.remove_orphans`). The
    folder is created only when the first open finds it missing."""
    tmp = path.parent / f".tmp-{path.name}-{threading.get_ident()}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o600)
    except FileNotFoundError:
        ensure_dir(path.parent)
        fd = os.open(tmp, flags, 0o600)
    size = 0
    try:
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
                size += len(chunk)
            os.fsync(fd)
            if uncache:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return size


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, 'DICM' and the File Meta Information group (Explicit VR Little Endian, PS3.10 7.1)
    of a received instance, encoded directly: pydicom's writer costs a sizeable share of the
    C-STORE handler for six short elements. Same bytes as pydicom's `write_file_meta_info` of
    pynetdicom's `Event.file_meta` (tests/test_spool.py checks it)."""
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

    def element(tag: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
        if len(value) % 2:
            value += pad
        if vr == b"OB":
            return struct.pack("<HH2sHI", 2, tag, vr, 0, len(value)) + value
        return struct.pack("<HH2sH", 2, tag, vr, len(value)) + value

    body = b"".join((
        element(0x0001, b"OB", b"\x00\x01", b"\x00"),
        element(0x0002, b"UI", sop_class_uid.encode("ascii"), b"\x00"),
        element(0x0003, b"UI", sop_instance_uid.encode("ascii"), b"\x00"),
        element(0x0010, b"UI", transfer_syntax_uid.encode("ascii"), b"\x00"),
        element(0x0012, b"UI", str(PYNETDICOM_IMPLEMENTATION_UID).encode("ascii"), b"\x00"),
        element(0x0013, b"SH", PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii"), b" "),
    ))
    return b"\x00" * 128 + b"DICM" + struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(body)) + body


def write_dataset(path: Path, ds: Dataset) -> int:
    """Durably write a pydicom Dataset as a Part 10 file."""
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return write_atomic(path, [buf.getvalue()])


class Spool:
    """The node's storage folder: incoming instances and encoded outputs."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.incoming = self.root / "incoming"
        self.outgoing = self.root / "out"
        for d in (self.root, self.incoming, self.outgoing):
            d.mkdir(parents=True, exist_ok=True)
        self._lock_path = self.root / ".removal.lock"
        self._lock_files = threading.local()

    # -- storing against removing, across processes ----------------------------------------------
    # An instance is written to the spool, then recorded in the journal, then acknowledged.
    # Whoever removes received files (retention in the node, `queue purge` in another process)
    # must not do so between that write and that record, or an acknowledged instance would be
    # recorded without its file. A flock(2) on one file settles it between processes: storing
    # holds it shared (each thread through its own open file, so they do not serialise),
    # removing holds it exclusively. Within the node, `Journal.series_lock` also orders the two.
    def _lock_file(self):
        fh = getattr(self._lock_files, "fh", None)
        if fh is None:  # closed with the thread's locals when the thread ends
            fh = self._lock_files.fh = open(self._lock_path, "a+b")  # noqa: SIM115
        return fh

    def storing(self) -> contextlib.AbstractContextManager[None]:
        """Held while an instance is written and recorded (shared: stores do not wait for each other)."""
        return self._flock(fcntl.LOCK_SH)

    def removing(self) -> contextlib.AbstractContextManager[None]:
        """Held while received files are checked and removed: waits for stores in progress and
        holds new ones back until it is released."""
        return self._flock(fcntl.LOCK_EX)

    @contextlib.contextmanager
    def _flock(self, mode: int) -> Iterator[None]:
        fh = self._lock_file()
        fcntl.flock(fh, mode)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)

    def remove_orphans(self) -> int:
        """Delete the temporary files of writes that a crash interrupted (they were never
        acknowledged); return how many. Call before the node accepts connections."""
        removed = 0
        for tmp in (*self.incoming.rglob(".tmp-*"), *self.outgoing.rglob(".tmp-*")):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed += 1
        return removed

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        study = check_uid(study_uid, "Study Instance UID")
        series = check_uid(series_uid, "Series Instance UID")
        sop = check_uid(sop_uid, "SOP Instance UID")
        return self.incoming / study / series / f"{sop}.dcm"

    def series_dir(self, study_uid: str, series_uid: str) -> Path:
        return self.incoming / check_uid(study_uid, "Study Instance UID") / check_uid(series_uid, "Series Instance UID")

    def output_dir(self, job_id: int) -> Path:
        return self.outgoing / f"job-{int(job_id):08d}"

    def free_mb(self) -> float:
        return shutil.disk_usage(self.root).free / 2**20

    def remove_tree(self, path: Path) -> None:
        """Remove a folder inside the spool (refuses anything outside it)."""
        path = Path(path).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError(f"refusing to delete outside the spool: {path}")
        shutil.rmtree(path, ignore_errors=True)
        parent = path.parent
        while parent != self.incoming.resolve() and parent != self.outgoing.resolve() and parent.exists():
            try:
                parent.rmdir()  # prune empty study folders
            except OSError:
                break
            parent = parent.parent

