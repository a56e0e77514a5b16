"""Test doubles for the processing stage (the shipped `serve` never emits fake images).

They run in the node's inference process (a spawned child), so the tests steer them through
files and the series they send, never through attributes set after the node started."""

from __future__ import annotations

import copy
import os
import threading
import time
from pathlib import Path

from pydicom.uid import generate_uid

from dicomnode.records import ProcessResult


class CopyProcessor:
    """Returns one derived copy per source instance with deterministic new UIDs."""

    name = "test-copy"

    def __init__(self, fail: bool = False, delay: float = 0.0, fail_while: str | Path | None = None):
        self.fail = fail
        self.delay = delay
        self.fail_while = str(fail_while) if fail_while else None  # fails while this file exists
        self.calls = 0

    def process(self, series, datasets):
        self.calls += 1
        if self.delay:
            threading.Event().wait(self.delay)
        if self.fail or (self.fail_while and os.path.exists(self.fail_while)):
            raise RuntimeError("test double asked to fail")
        series_uid = generate_uid(entropy_srcs=["copy", series.series_instance_uid])
        out = []
        for ds in datasets:
            new = copy.deepcopy(ds)
            new.SeriesInstanceUID = series_uid
            new.SOPInstanceUID = generate_uid(entropy_srcs=["copy", str(ds.SOPInstanceUID)])
            new.file_meta.MediaStorageSOPInstanceUID = new.SOPInstanceUID
            new.SeriesDescription = "TEST DOUBLE OUTPUT"
            out.append(new)
        return ProcessResult(out, {"infer": 0.0})


class MisbehavingProcessor(CopyProcessor):
    """Copies like CopyProcessor, except for a series whose SeriesDescription names a fault:
    HANG sleeps forever, ABORT calls os.abort(), ALLOCATE allocates memory until it is killed
    (by the test, standing in for the kernel's OOM killer), RAISE raises."""

    name = "test-misbehaving"

    def process(self, series, datasets):
        what = str(datasets[0].get("SeriesDescription", ""))
        if "HANG" in what:
            while True:
                time.sleep(1)
        if "ABORT" in what:
            os.abort()
        if "ALLOCATE" in what:
            hoard = []
            while True:
                hoard.append(bytearray(16 * 2**20))  # bytearray zero-fills: the pages are really touched
        if "RAISE" in what:
            raise ValueError("test double raised on purpose")
        return super().process(series, datasets)
