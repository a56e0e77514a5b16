"""One geometry: the selection rules, preprocessing and the training pairer accept and refuse the
same series for the same reasons (`dicomnode.geometry`), and non-finite values never pass."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomnode.config import RulesConfig
from dicomnode.geometry import GeometryError, make_geometry, stack_of
from dicomnode.infer.preprocess import SeriesError, prepare_series
from dicomnode.rules import evaluate
from tests.support.dicomfactory import make_series
from tests.support.peers import dcmtk, run
from training.data import BrokenPair, _check_mr, read_header

ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"


def _set(k, keyword, value):
    def edit(series):
        setattr(series[k], keyword, value)
    return edit


PERTURBATIONS = {
    "nan position": (_set(2, "ImagePositionPatient", [float("nan"), -100.0, 120.0]), "not finite"),
    "inf spacing": (_set(1, "PixelSpacing", [0.9, float("inf")]), "not finite"),
    "duplicate position": (lambda s: setattr(s[3], "ImagePositionPatient", list(s[2].ImagePositionPatient)),
                           "same position"),
    "tilted slice": (_set(4, "ImageOrientationPatient", [0.0, 0.99619, 0.08716, 0.0, 0.08716, -0.99619]),
                     "Image Orientation (Patient) differs"),
    "other spacing": (_set(1, "PixelSpacing", [0.8, 0.8]), "Pixel Spacing"),
    "not orthonormal": (_set(0, "ImageOrientationPatient", [0.0, 2.0, 0.0, 0.0, 0.0, -1.0]), "orthogonal unit"),
}


def series(tmp_path, edit=None):
    paths = make_series(tmp_path, slices=8)
    datasets = [dcmread(p) for p in paths]
    if edit:
        edit(datasets)
        for ds, p in zip(datasets, paths):
            ds.save_as(p)
    return paths, datasets


@pytest.mark.parametrize("case", sorted(PERTURBATIONS))
def test_rules_preprocessing_and_training_refuse_the_same_series(tmp_path, case):
    edit, reason = PERTURBATIONS[case]
    paths, datasets = series(tmp_path, edit)
    decision = evaluate(RulesConfig(min_slices=3), datasets[0].SeriesInstanceUID, datasets)
    assert not decision.matched and decision.rule is None
    geometry = next(c for c in decision.checks if c["check"] == "geometry")
    assert not geometry["ok"] and reason in geometry["detail"], geometry
    with pytest.raises(SeriesError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        prepare_series(paths)
    with pytest.raises(BrokenPair, match="mismatched geometry"):
        _check_mr([read_header(p) for p in paths])


def test_a_clean_series_passes_all_three(tmp_path):
    paths, datasets = series(tmp_path)
    assert evaluate(RulesConfig(min_slices=3), datasets[0].SeriesInstanceUID, datasets).matched
    assert len(prepare_series(paths)) == 8
    ordered, positions = _check_mr([read_header(p) for p in reversed(paths)])
    assert np.allclose(np.diff(positions), 3.3)


def test_a_missing_slice_is_uneven_spacing_for_rules_and_training(tmp_path):
    paths, datasets = series(tmp_path)
    del paths[4], datasets[4]
    decision = evaluate(RulesConfig(min_slices=3), datasets[0].SeriesInstanceUID, datasets)
    assert not decision.matched and "uneven slice spacing" in decision.reason
    with pytest.raises(BrokenPair, match="missing slices: uneven slice spacing"):
        _check_mr([read_header(p) for p in paths])
    assert len(prepare_series(paths)) == 7  # preprocessing works per slice; selection is what refuses


def test_stack_orders_along_the_normal_not_by_input():
    g = [make_geometry(4, 4, (1, 1), (x, 0, 0), (0, 1, 0, 0, 0, -1)) for x in (0.0, 6.0, 3.0)]
    stack = stack_of(g)  # the normal of this sagittal orientation points to -x
    assert stack.normal == (-1.0, 0.0, 0.0)
    assert stack.order == (1, 2, 0) and stack.locations == (-6.0, -3.0, 0.0) and stack.gap == 3.0
    with pytest.raises(GeometryError, match="not finite"):
        make_geometry(4, 4, (1, 1), (math.nan, 0, 0), (0, 1, 0, 0, 0, -1))


def write_enhanced_mr(path, frames: int = 8) -> Dataset:
    """A multi-frame Enhanced MR object of a sagittal T2 FS series without per-frame functional
    groups: its frames cannot be placed (tests/test_enhanced_mr.py has complete ones)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ENHANCED_MR, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = ENHANCED_MR, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.SeriesDescription, ds.InstanceNumber = "MR", "t2_tse_fs_sag", 1
    ds.PatientName, ds.PatientID = "TEST^ENHANCED", "PID0002"
    ds.NumberOfFrames, ds.Rows, ds.Columns = frames, 32, 32
    orient, plane = Dataset(), Dataset()
    orient.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    plane.PlaneOrientationSequence = [orient]
    ds.SharedFunctionalGroupsSequence = [plane]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.zeros((frames, 32, 32), np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_enhanced_mr_without_frame_positions_is_not_selected_and_rules_test_says_why(tmp_path):
    from typer.testing import CliRunner

    from dicomnode.cli import app

    (tmp_path / "in").mkdir()
    ds = write_enhanced_mr(tmp_path / "in" / "enhanced.dcm")
    decision = evaluate(RulesConfig(), ds.SeriesInstanceUID, [ds])
    assert not decision.matched
    assert "instance #1: 8 frames but 0 per-frame functional group items" in decision.reason
    r = CliRunner().invoke(app, ["rules", "test", str(tmp_path / "in")])
    assert r.exit_code == 0 and "REJECT" in r.output


@pytest.mark.integration
def test_enhanced_mr_without_frame_positions_sent_to_the_node_is_ignored_with_the_reason(tmp_path, port):
    from dicomnode.journal import JobState
    from dicomnode.node import Node
    from tests.support.nodehelpers import make_config

    write_enhanced_mr(tmp_path / "enhanced.dcm")
    cfg = make_config(tmp_path, port, series={"quiet_seconds": 1.0},
                      rules={"sop_classes": ["1.2.840.10008.5.1.4.1.1.4", ENHANCED_MR]})
    with Node(cfg) as node:
        run([dcmtk("storescu"), "-aec", "DICOMNODE", "127.0.0.1", str(port), str(tmp_path / "enhanced.dcm")])
        import time

        deadline = time.time() + 20
        while time.time() < deadline and not node.journal.jobs([JobState.IGNORED]):
            time.sleep(0.1)
        (job,) = node.journal.jobs()
        assert job.state == JobState.IGNORED and "per-frame functional group" in job.reason
