"""Test doubles for the processing stage (the shipped `serve` never emits fake images)."""

from __future__ import annotations

import copy
import threading

from pydicom.uid import generate_uid

from dicomnode.records import ProcessResult


class CopyProcessor:
    """Returns one derived copy per source instance with deterministic new UIDs."""

    name = "test-copy"

    def __init__(self, fail: bool = False, delay: float = 0.0):
        self.fail = fail
        self.delay = delay
        self.calls = 0

    def process(self, series, datasets):
        self.calls += 1
        if self.delay:
            threading.Event().wait(self.delay)
        if self.fail:
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
