"""Preprocessing: decoding of every transfer syntax, slice ordering, geometry checks, grid round trip."""

from __future__ import annotations

import copy
import random
import shutil
import subprocess

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from dicomnode.infer.grid import GridPlacement, normalize_series, rgb_to_unit
from dicomnode.infer.preprocess import PreparedSeries, SeriesError, outputs_to_rgb, prepare_series
from tests.support.synthmr import make_series


def expected_batch(series) -> np.ndarray:
    """Reference: normalise the true (slice-order) volume and place it on the grid with grid.py."""
    vol = normalize_series(np.stack([ds.pixel_array.astype(np.float32) for ds in series]))
    ps = series[0].PixelSpacing
    place = GridPlacement.for_image(series[0].Rows, series[0].Columns, (float(ps[0]), float(ps[1])))
    return np.stack([place.to_grid(s) for s in vol])[:, None]


def write(series, tmp_path, name="s"):
    paths = []
    for i, ds in enumerate(series):
        path = tmp_path / f"{name}{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def shuffled(items, seed=3):
    items = list(items)
    random.Random(seed).shuffle(items)
    return items


def test_orders_by_position_not_instance_number():
    series = make_series(5)
    expected = expected_batch(series)
    for ds, number in zip(series, (4, 1, 5, 3, 2)):  # Instance Numbers that disagree with position
        ds.InstanceNumber = number
    prepared = prepare_series(shuffled(series))
    assert isinstance(prepared, PreparedSeries) and len(prepared) == 5
    assert [ds.SOPInstanceUID for ds in prepared.datasets] == [ds.SOPInstanceUID for ds in series]
    assert prepared.batch.shape == (5, 1, 256, 256) and prepared.batch.dtype == np.float32
    np.testing.assert_allclose(prepared.batch, expected, atol=1e-6)
    locations = [g.location for g in prepared.geometry]
    assert locations == sorted(locations) and np.allclose(np.diff(locations), 4.0)


def test_oblique_sagittal_shuffled_files(tmp_path):
    series = make_series(4, tilt_deg=10.0)
    prepared = prepare_series(shuffled(write(series, tmp_path)))
    assert [ds.SOPInstanceUID for ds in prepared.datasets] == [ds.SOPInstanceUID for ds in series]
    assert np.allclose(np.abs(prepared.normal), (1.0, 0.0, 0.0), atol=1e-6)  # tilt is about L-R
    assert np.allclose(np.diff([g.location for g in prepared.geometry]), 4.0, atol=1e-3)
    np.testing.assert_allclose(prepared.batch, expected_batch(series), atol=1e-6)


def test_non_square_matrix_and_round_trip():
    series = make_series(3, rows=64, cols=48, spacing=(0.5, 1.0))  # 32 mm high, 48 mm wide
    prepared = prepare_series(series)
    place = prepared.placements[0]
    assert (place.scaled_rows, place.scaled_cols) == (171, 256)  # physical aspect 2:3 kept
    # Model output = a known RGB image placed on the grid -> comes back at source Rows x Columns.
    yy, xx = np.mgrid[0:64, 0:48]
    ramp = np.stack([yy * 4, xx * 5, np.full_like(yy, 128)], axis=-1).astype(np.uint8)
    rgbs = [ramp, ramp[::-1], ramp[:, ::-1]]
    outputs = np.stack([p.to_grid(rgb_to_unit(im)) for p, im in zip(prepared.placements, rgbs)])
    back = outputs_to_rgb(prepared, outputs)
    assert [b.shape for b in back] == [(64, 48, 3)] * 3 and all(b.dtype == np.uint8 for b in back)
    assert max(int(np.abs(b.astype(int) - s.astype(int)).max()) for b, s in zip(back, rgbs)) <= 2
    with pytest.raises(ValueError, match="shape"):
        outputs_to_rgb(prepared, outputs[:2])


def test_rescale_is_applied():
    series = make_series(3)
    expected = expected_batch(series)
    halved = series[1]
    halved.PixelData = (halved.pixel_array // 2).astype(np.uint16).tobytes()
    halved.RescaleSlope, halved.RescaleIntercept = 2, 0
    offset = series[2]
    offset.PixelData = (offset.pixel_array + 100).astype(np.uint16).tobytes()
    offset.RescaleSlope, offset.RescaleIntercept = 1, -100
    batch = prepare_series(series).batch
    np.testing.assert_allclose(batch[[0, 2]], expected[[0, 2]], atol=0.01)  # percentiles move slightly
    assert np.abs(batch[1] - expected[1]).max() < 0.01


def _compress_pydicom(ts, **kw):
    def run(series, tmp_path):
        out = []
        for ds in series:
            ds = copy.deepcopy(ds)
            ds.compress(ts, generate_instance_uid=False, **kw)
            out.append(ds)
        return write(out, tmp_path)
    return run


def _syntax_pydicom(ts):
    def run(series, tmp_path):
        for ds in series:
            ds.file_meta.TransferSyntaxUID = ts
        return write(series, tmp_path)
    return run


def _dcmtk(tool, *opts):
    def run(series, tmp_path):
        if not shutil.which(tool):
            pytest.skip(f"{tool} (DCMTK) not installed")
        out = []
        for src in write(series, tmp_path, "raw"):
            dst = src.with_name(src.name.replace("raw", "c"))
            subprocess.run([tool, *opts, str(src), str(dst)], check=True, capture_output=True)
            out.append(dst)
        return out
    return run


# (writer, max abs difference of the normalised batch from the uncompressed reference)
SYNTAXES = {
    "explicit-le": (_syntax_pydicom(ExplicitVRLittleEndian), 1e-6),
    "implicit-le": (_syntax_pydicom(ImplicitVRLittleEndian), 1e-6),
    "deflate": (_syntax_pydicom(DeflatedExplicitVRLittleEndian), 1e-6),
    "rle-pydicom": (_compress_pydicom(RLELossless), 1e-6),
    "jpeg-ls-lossless": (_compress_pydicom(JPEGLSLossless), 1e-6),
    "j2k-lossless": (_compress_pydicom(JPEG2000Lossless), 1e-6),
    "j2k-lossy": (_compress_pydicom(JPEG2000, j2k_psnr=[70]), 0.05),
    "rle-dcmtk": (_dcmtk("/usr/bin/dcmcrle"), 1e-6),
    "jpeg-lossless-sv1": (_dcmtk("/usr/bin/dcmcjpeg", "+e1"), 1e-6),
    "jpeg-lossless-p14": (_dcmtk("/usr/bin/dcmcjpeg", "+el"), 1e-6),
    "jpeg-extended-12bit": (_dcmtk("/usr/bin/dcmcjpeg", "+ee", "+un"), 0.25),
    "jpeg-ls-dcmtk": (_dcmtk("/usr/bin/dcmcjpls"), 1e-6),
}


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_decodes_transfer_syntax(syntax, tmp_path):
    writer, tol = SYNTAXES[syntax]
    series = make_series(3, rows=40, cols=32)
    expected = expected_batch(series)
    prepared = prepare_series(shuffled(writer(copy.deepcopy(series), tmp_path)))
    assert [ds.SOPInstanceUID for ds in prepared.datasets] == [ds.SOPInstanceUID for ds in series]
    assert np.abs(prepared.batch - expected).max() <= tol
    if tol > 1e-6:  # lossy, but still the same picture
        assert np.corrcoef(prepared.batch.ravel(), expected.ravel())[0, 1] > 0.99


def test_jpeg_baseline_8bit(tmp_path):
    if not shutil.which("/usr/bin/dcmcjpeg"):
        pytest.skip("DCMTK not installed")
    series = make_series(3, rows=40, cols=32)
    for ds in series:
        ds.PixelData = (ds.pixel_array >> 4).astype(np.uint8).tobytes()
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    expected = expected_batch(series)
    prepared = prepare_series(_dcmtk("/usr/bin/dcmcjpeg", "+eb")(series, tmp_path))
    assert prepared.datasets[0].file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    assert np.corrcoef(prepared.batch.ravel(), expected.ravel())[0, 1] > 0.99


@pytest.mark.filterwarnings("ignore:Unknown encoding")  # the cut may fall inside the charset value
@pytest.mark.parametrize("keep, reason", [(0.6, "less than expected"), (0.05, "truncated")])
def test_truncated_file_names_the_instance(keep, reason, tmp_path):
    paths = write(make_series(3), tmp_path)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(SeriesError, match=f"{paths[1].name}.*{reason}"):
        prepare_series(paths)


def test_undecodable_compressed_pixels(tmp_path):
    series = make_series(2)
    series[0].compress(RLELossless, generate_instance_uid=False)
    series[0].PixelData = series[0].PixelData[:40]  # broken RLE fragment
    with pytest.raises(SeriesError, match="cannot decode.*RLE Lossless"):
        prepare_series(series)


def _edit(attr, value):
    def run(series):
        setattr(series[2], attr, value)
    return run


@pytest.mark.parametrize("edit, message", [
    (_edit("ImageOrientationPatient", [1, 0, 0, 0, 0, -1]), "Image Orientation"),
    (_edit("PixelSpacing", [0.9, 0.9]), "Pixel Spacing"),
    (_edit("Rows", 32), "matrix 32x48"),
    (_edit("SeriesInstanceUID", "1.2.3.4"), "another series"),
    (lambda s: setattr(s[2], "ImagePositionPatient", s[1].ImagePositionPatient), "same position"),
    (lambda s: delattr(s[2], "ImagePositionPatient"), "geometry"),
    (lambda s: s.append(s[0]), "twice"),
])
def test_inconsistent_series_rejected(edit, message):
    series = make_series(4)
    edit(series)
    with pytest.raises(SeriesError, match=message):
        prepare_series(series)


def test_empty_series_rejected():
    with pytest.raises(SeriesError, match="empty"):
        prepare_series([])


@settings(max_examples=25, deadline=None)
@given(angles=st.tuples(*[st.floats(-3.1, 3.1)] * 3), n=st.integers(2, 5), seed=st.integers(0, 99))
def test_ordering_for_any_orientation(angles, n, seed):
    """Whatever the plane orientation, slices come out ordered along the normal (right-handed)."""
    a, b, c = angles
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
    rot = rz @ ry @ rx
    series = make_series(n, rows=8, cols=6, seed=seed)
    normal = np.cross(rot[:, 0], rot[:, 1])
    for k, ds in enumerate(series):
        ds.ImageOrientationPatient = [float(v) for v in np.concatenate([rot[:, 0], rot[:, 1]])]
        ds.ImagePositionPatient = [float(v) for v in np.array([5.0, -3.0, 2.0]) + 2.5 * k * normal]
    prepared = prepare_series(shuffled(series, seed))
    assert [ds.SOPInstanceUID for ds in prepared.datasets] == [ds.SOPInstanceUID for ds in series]
    np.testing.assert_allclose(prepared.normal, normal, atol=1e-9)
