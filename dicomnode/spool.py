"""Durable files: what the node acknowledges is on disk before it says so.

Every write goes to a temporary file in the target folder, is fsynced, atomically renamed over
the final name and the folder is fsynced, so a crash leaves either the old file or the new one,
never a torn one. Paths are built only from validated UIDs (digits and dots), so nothing a
peer sends can escape the spool.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from pydicom import Dataset
from pydicom.filewriter import write_file_meta_info

UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")


class InvalidUID(ValueError):
    pass


def check_uid(uid: object, what: str) -> str:
    """Return `uid` as a str if it is a syntactically safe DICOM UID, else raise InvalidUID."""
    text = str(uid or "").strip().rstrip("\x00")
    if not text or len(text) > 64 or not UID_RE.fullmatch(text):
        raise InvalidUID(f"{what} is not a valid UID: {text[:80]!r}")
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


def write_atomic(path: Path, chunks: Iterable[bytes]) -> int:
    """Write `chunks` to `path` durably (temp file, fsync, rename, directory fsync); return size."""
    ensure_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    size = 0
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
                size += len(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return size


def part10_chunks(file_meta: Dataset, encoded_dataset: bytes) -> list[bytes]:
    """The bytes of a DICOM Part 10 file: preamble, 'DICM', file meta, then the data set as received.

    Like pynetdicom's `Event.encoded_dataset(include_meta=True)`, but as two chunks, so the data
    set (often half a megabyte) is written as received instead of copied into one new buffer."""
    from io import BytesIO

    buf = BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, file_meta, enforce_standard=True)
    return [buf.getvalue(), encoded_dataset]


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

