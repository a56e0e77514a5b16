"""Phantom generator: determinism, DICOM validity (dciodvfy), pairing geometry, lesions, uptake."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode.tools.fusion import OPACITY, SUV_WINDOW
from dicomnode.tools.phantom import generate, plan_cases, render_fusion, simulate, write_case
from dicomnode.tools.suv import suv_from_pet

TINY = dict(min_matrix=64, max_matrix=96, min_slices=3, max_slices=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantom") / "export"
    generate(out, 5, seed=11, lesion_fraction=0.6, **TINY)
    return out


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.dcm"))


def _dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def test_same_seed_same_bytes_other_seed_differs(tiny, tmp_path):
    again = tmp_path / "again"
    generate(again, 5, seed=11, lesion_fraction=0.6, **TINY)
    a, b = _files(tiny), _files(again)
    assert [p.relative_to(tiny) for p in a] == [p.relative_to(again) for p in b]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
    other = tmp_path / "other"
    generate(other, 5, seed=12, lesion_fraction=0.6, **TINY)
    mr_a = pydicom.dcmread(tiny / "case0000" / "MR" / "001.dcm")
    mr_c = pydicom.dcmread(other / "case0000" / "MR" / "001.dcm")
    assert mr_a.StudyInstanceUID != mr_c.StudyInstanceUID
    assert mr_a.PixelData != mr_c.PixelData


def test_every_object_passes_dciodvfy(tiny):
    # every MR and SC object; of a scanner's PET series (100-200 slices), the first, middle and last
    files = [f for f in _files(tiny) if f.parent.name != "PET"]
    for pet in sorted(tiny.glob("case*/PET")):
        slices = sorted(pet.glob("*.dcm"))
        files += [slices[0], slices[len(slices) // 2], slices[-1]]
    kinds = {pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID.name for f in files}
    assert kinds == {"MR Image Storage", "Positron Emission Tomography Image Storage",
                     "Secondary Capture Image Storage"}
    bad = {str(f.relative_to(tiny)): e for f in files if (e := _dciodvfy_errors(f))}
    assert not bad


@pytest.mark.parametrize("kw", [
    dict(vendor="ge", weighting="STIR", rows=96, cols=80, patient_name="Müller^Jürgen"),
    dict(vendor="philips", orientation="axial", weighting="T1", rows=80, patient_name="Jäger^Anna",
         specific_character_set="ISO_IR 100"),
    dict(vendor="siemens", orientation="coronal", rows=64, cols=96, lesion=False),
])
def test_write_case_variants_are_valid(tmp_path, kw):
    rec = write_case(tmp_path, 5, slices=3, **kw)
    mr = pydicom.dcmread(rec["mr"][0])
    assert (mr.Rows, mr.Columns) == (kw["rows"], kw.get("cols", kw["rows"]))
    assert mr.Manufacturer.lower().startswith({"ge": "ge", "philips": "philips", "siemens": "siemens"}[kw["vendor"]])
    assert rec["orientation"] == kw.get("orientation", "sagittal")
    if "patient_name" in kw:
        assert str(mr.PatientName) == kw["patient_name"]
        assert mr.SpecificCharacterSet == kw.get("specific_character_set", "ISO_IR 192")
    if kw.get("weighting") == "STIR":
        assert mr.SeriesDescription == "Sag STIR" and "IR" in mr.ScanningSequence
    for f in (rec["mr"][0], rec["pet"][-1], rec["fusion"][1]):
        assert not _dciodvfy_errors(Path(f)), f


def test_mr_series_attributes(tiny):
    cases = json.loads((tiny / "cases.json").read_text())["cases"]
    for c in cases:
        series = [pydicom.dcmread(tiny / p) for p in c["mr"]]
        assert len(series) == c["slices"] == series[0].ImagesInAcquisition
        first = series[0]
        assert first.SOPClassUID.name == "MR Image Storage" and first.BitsStored == 12
        assert first.SeriesDescription == c["series_description"]
        assert {"FS"} <= set(first.ScanOptions if first.ScanOptions.__class__ is not str else [first.ScanOptions])
        vol = np.stack([d.pixel_array for d in series])
        assert vol.max() <= 4095 and vol.min() >= 0
        # Rician noise: air is not zero and its mean is well above zero (magnitude images)
        assert np.percentile(vol, 1) >= 0 and vol[vol < np.percentile(vol, 10)].mean() > 0
        pet = [pydicom.dcmread(tiny / p, stop_before_pixels=True) for p in c["pet"]]
        assert {p.FrameOfReferenceUID for p in pet} == {first.FrameOfReferenceUID}
        assert pet[0].Units == "BQML" and pet[0].StudyInstanceUID == first.StudyInstanceUID


def test_fusion_slice_k_is_rendered_on_mr_slice_k(tmp_path):
    # with the PET written on the MR grid (--pet-grid mr), each fusion is that PET slice over its MR slice
    generate(tmp_path, 3, seed=11, lesion_fraction=0.6, pet_grid="mr", **TINY)
    for c in json.loads((tmp_path / "cases.json").read_text())["cases"]:
        mr = {d.SOPInstanceUID: d for d in (pydicom.dcmread(tmp_path / p) for p in c["mr"])}
        pet = {d.SOPInstanceUID: d for d in (pydicom.dcmread(tmp_path / p) for p in c["pet"])}
        normal = None
        for k, p in enumerate(c["fusion"]):
            fu = pydicom.dcmread(tmp_path / p)
            assert fu.StudyInstanceUID == c["study_uid"] and fu.InstanceNumber == k + 1
            ref = fu.ReferencedImageSequence[0].ReferencedSOPInstanceUID
            m = mr[ref]
            assert m.InstanceNumber == k + 1
            src = {s.ReferencedSOPInstanceUID for s in fu.SourceImageSequence}
            assert ref in src
            pt = pet[next(iter(src - {ref}))]
            assert pt.ImagePositionPatient == m.ImagePositionPatient
            iop = np.array(m.ImageOrientationPatient, float)
            normal = np.cross(iop[:3], iop[3:])
            pos = float(np.dot(np.array(m.ImagePositionPatient, float), normal))
            assert pos == pytest.approx(float(m.SliceLocation), abs=1e-3)
            rgb = render_fusion(m.pixel_array, suv_from_pet(pt),
                                t2_window=(float(m.WindowCenter), float(m.WindowWidth)))
            diff = np.abs(rgb.astype(int) - fu.pixel_array.astype(int))
            assert diff.max() <= 1 and diff.mean() < 0.01
        positions = [float(np.dot(np.array(d.ImagePositionPatient, float), normal))
                     for d in sorted(mr.values(), key=lambda d: d.InstanceNumber)]
        assert np.all(np.diff(positions) > 0)


def test_render_fusion_window_colour_map_and_opacity():
    t2 = np.array([[0.0, 100.0], [200.0, 200.0]])
    suv = np.array([[0.0, 0.0], [0.0, 100.0]])
    rgb = render_fusion(t2, suv, t2_window=(100.0, 200.0))
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert tuple(rgb[0, 0]) == (0, 0, 0)  # black grey, no uptake
    assert tuple(rgb[0, 1]) == (64, 64, 64)  # mid grey at opacity 0.5, hot(0) = black
    assert tuple(rgb[1, 0]) == (128, 128, 128)
    assert tuple(rgb[1, 1]) == (255, 255, 255)  # above the SUV window: white-hot over white
    mid = render_fusion(np.zeros((1, 1)), np.full((1, 1), SUV_WINDOW[1] * 0.3), t2_window=(1, 2))
    assert mid[0, 0, 0] > 0 and mid[0, 0, 1] == 0 and mid[0, 0, 2] == 0  # low uptake is red
    assert OPACITY == 0.5


def test_lesion_fraction_and_patients():
    specs = plan_cases(172, seed=3, lesion_fraction=0.3)
    assert sum(s.lesion for s in specs) == round(0.3 * 172)
    per_patient = np.bincount([s.patient_index for s in specs])
    assert len(per_patient) == 94 and per_patient.max() > 1 and per_patient.min() >= 1
    assert len({s.patient_id for s in specs}) == 94
    sizes = {(s.rows, s.cols) for s in specs}
    assert all(256 <= r <= 512 and 256 <= c <= 512 for r, c in sizes)
    assert any(r != c for r, c in sizes) and len(sizes) > 3
    assert all(12 <= s.slices <= 20 for s in specs)
    assert len({s.vendor for s in specs}) == 3
    assert sum(s.lesion for s in plan_cases(10, seed=1, lesion_fraction=0.0)) == 0


def test_cases_json_records_uptake(tiny):
    data = json.loads((tiny / "cases.json").read_text())
    cases = data["cases"]
    assert sum(c["lesion"] for c in cases) == 3  # round(5 * 0.6)
    for c in cases:
        assert (c["suv_max"] is not None) == c["lesion"]
        if c["lesion"]:
            assert c["suv_max"] > 1.5 and c["uptake_group"] in ("low", "moderate", "high")
        assert c["vendor"] in ("siemens", "ge", "philips")


def test_uptake_is_not_a_function_of_t2_signal():
    """Across lesions, SUVmax regressed on the lesion's mean T2 signal explains < 80 % of variance."""
    specs = plan_cases(14, seed=21, lesion_fraction=1.0, min_matrix=64, max_matrix=64, min_slices=6, max_slices=6)
    suv_max, t2 = [], []
    for s in specs:
        sim = simulate(s)
        assert sim.lesion_mask.any()
        norm = sim.mr / np.percentile(sim.mr, 99.5)
        suv_max.append(float(sim.suv[sim.lesion_mask].max()))
        t2.append(float(norm[sim.lesion_mask].mean()))
    x, y = np.asarray(t2), np.asarray(suv_max)
    r2 = np.corrcoef(x, y)[0, 1] ** 2
    assert r2 < 0.8
    assert y.std() > 0.5  # uptake really varies between lesions


def test_hidden_uptake_values_leave_the_mr_unchanged():
    """The values listed as HIDDEN_UPTAKE change the PET and nothing the MR shows, and `scene` +
    `paint_case` reproduce `simulate` (bench/bench_ceiling.py's MR-only bound relies on both)."""
    import copy
    import dataclasses

    from dicomnode.tools.phantom.anatomy import Anatomy, Lesion, paint_case
    from dicomnode.tools.phantom.generate import scene

    spec = plan_cases(1, seed=5, lesion_fraction=1.0, min_matrix=64, max_matrix=64, min_slices=6, max_slices=6)[0]
    sc = scene(spec)
    same = paint_case(sc.anatomy, sc.grid, spec.weighting, sc.lesion, sc.modic, copy.deepcopy(sc.rng))
    assert np.array_equal(same.suv, simulate(spec).suv_true)
    rng = np.random.default_rng(0)
    anat = dataclasses.replace(sc.anatomy, **{f: getattr(Anatomy.sample(rng), f) for f in Anatomy.HIDDEN_UPTAKE})
    lesion = dataclasses.replace(sc.lesion, **{f: getattr(Lesion.sample(rng), f) for f in Lesion.HIDDEN_UPTAKE})
    other = paint_case(anat, sc.grid, spec.weighting, lesion, sc.modic, copy.deepcopy(sc.rng))
    assert np.array_equal(other.mr, same.mr)
    assert np.array_equal(other.spine_mask, same.spine_mask)
    assert np.abs(other.suv - same.suv).max() > 0.1


def test_spine_mask_is_the_vertebral_bodies_and_discs():
    """`Simulated.spine_mask` (the model observer's region in bench_ceiling) holds the bodies'
    marrow and most of an infected disc's lesion, and little else."""
    import copy
    import dataclasses

    from dicomnode.tools.phantom.anatomy import paint_case
    from dicomnode.tools.phantom.generate import scene

    spec = plan_cases(1, seed=5, lesion_fraction=1.0, min_matrix=64, max_matrix=64, min_slices=6, max_slices=6)[0]
    sim = simulate(spec)
    m = sim.spine_mask
    assert m.shape == sim.mr.shape and m.dtype == bool
    assert 0.01 < m.mean() < 0.15
    sc = scene(spec)  # the marrow's pixels: those whose SUV follows the marrow SUV
    hot = paint_case(dataclasses.replace(sc.anatomy, marrow_suv=sc.anatomy.marrow_suv + 5.0), sc.grid,
                     spec.weighting, sc.lesion, sc.modic, copy.deepcopy(sc.rng))
    marrow = np.abs(hot.suv - sim.suv_true) > 2.5
    assert (marrow & m).sum() / m.sum() > 0.5  # the bodies are mostly marrow
    assert (marrow & m).sum() / marrow.sum() > 0.4  # the rest of the marrow is in the posterior elements
    assert (sim.lesion_mask & m).sum() / sim.lesion_mask.sum() > 0.5


def test_cli_phantom_with_preview(tmp_path):
    from typer.main import get_command
    from typer.testing import CliRunner

    from dicomnode.cli import app

    args = [str(tmp_path / "out"), "--cases", "2", "--seed", "4", "--min-matrix", "64", "--max-matrix", "64",
            "--min-slices", "2", "--max-slices", "2", "--preview"]
    if hasattr(get_command(app), "commands"):  # several commands registered: name the subcommand
        args = ["phantom", *args]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "preview.png").stat().st_size > 1000
    assert len(json.loads((tmp_path / "out" / "cases.json").read_text())["cases"]) == 2
    assert "PHS" not in res.output  # no patient IDs on the console


def test_workers_do_not_change_output(tmp_path, tiny):
    par = tmp_path / "par"
    generate(par, 5, seed=11, lesion_fraction=0.6, jobs=2, **TINY)
    for a in _files(tiny)[::7]:
        assert a.read_bytes() == (par / a.relative_to(tiny)).read_bytes()
    shutil.rmtree(par)


def test_pet_blur_fwhm_and_rician_background():
    from dicomnode.tools.phantom.grid import SliceGrid
    from dicomnode.tools.phantom.uptake import mr_acquire, pet_acquire

    grid = SliceGrid("sagittal", 9, 101, 101, 0.5, 0.5, 2.0, 2.0, (0.0, 0.0, 0.0))
    point = np.zeros(grid.shape, np.float32)
    point[4, 50, 50] = 100.0
    out = pet_acquire(point, grid, fwhm_mm=5.0, noise=0.0, rng=np.random.default_rng(0))
    profile = out[4, 50]
    above = np.flatnonzero(profile >= profile.max() / 2)
    fwhm = (above[-1] - above[0] + 1) * grid.col_spacing
    assert 4.5 <= fwhm <= 5.5
    zero = np.zeros((2, 64, 64), np.float32)
    mag = mr_acquire(zero, SliceGrid("sagittal", 2, 64, 64, 1, 1, 3, 3, (0.0, 0.0, 0.0)), gain=1000.0,
                     noise=0.03, rng=np.random.default_rng(1))
    # Rician (Rayleigh at zero signal): mean = sigma * sqrt(pi / 2), never negative
    assert mag.mean() == pytest.approx(30.0 * np.sqrt(np.pi / 2), rel=0.05)


@pytest.mark.parametrize("vendor", ["siemens", "ge", "philips"])
def test_pet_is_written_as_the_scanner_writes_it(tmp_path, vendor):
    """Axial PT slices on the PET's own grid, covering the MR field of view, on the MR's Frame of
    Reference, with what SUV needs; SUV read back by the QIBA rules is what the phantom simulated."""
    from dicomnode.tools.phantom.generate import plan_cases

    rec = write_case(tmp_path, 7, vendor=vendor, rows=64, slices=8, lesion=True)
    mr = [pydicom.dcmread(p) for p in rec["mr"]]
    pet = [pydicom.dcmread(p) for p in rec["pet"]]
    first = pet[0]
    assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert 2.0 <= float(first.PixelSpacing[0]) <= 4.0 and 128 <= first.Rows <= 256 and first.Rows == first.Columns
    assert {p.FrameOfReferenceUID for p in pet} == {mr[0].FrameOfReferenceUID}
    assert first.Units == "BQML" and {"ATTN", "DECY"} <= set(first.CorrectedImage) and first.DecayCorrection == "START"
    radio = first.RadiopharmaceuticalInformationSequence[0]
    assert float(radio.RadionuclideTotalDose) > 1e8 and float(radio.RadionuclideHalfLife) == pytest.approx(6586.2)
    assert radio.RadiopharmaceuticalStartDateTime[:8] == first.SeriesDate and float(first.PatientWeight) > 30
    uptake = (int(first.SeriesTime[:2]) * 60 + int(first.SeriesTime[2:4])) - (
        int(radio.RadiopharmaceuticalStartTime[:2]) * 60 + int(radio.RadiopharmaceuticalStartTime[2:4]))
    assert 54 <= uptake <= 76 and first.AcquisitionTime == first.SeriesTime
    assert len({p.RescaleSlope for p in pet}) > 1  # per-slice slope
    z = sorted(float(p.ImagePositionPatient[2]) for p in pet)
    mr_z = [float(m.ImagePositionPatient[2]) - r * float(m.PixelSpacing[0]) for m in mr[:1] for r in (0, m.Rows - 1)]
    assert z[0] <= min(mr_z) + 1e-3 and z[-1] >= max(mr_z) - 1e-3
    assert np.allclose(np.diff(z), float(first.SliceThickness), atol=1e-3)
    assert not _dciodvfy_errors(Path(rec["pet"][len(pet) // 2]))
    spec = plan_cases(1, 7)[0]
    spec.vendor, spec.rows, spec.cols, spec.slices, spec.lesion = vendor, 64, 64, 8, True
    sim = simulate(spec)
    assert sim.pet_grid is not None and sim.pet_suv is not None and sim.pet_grid.slices == len(pet)
    order = np.argsort([float(p.ImagePositionPatient[2]) for p in pet])
    read = np.stack([suv_from_pet(pet[i]) for i in order])
    assert np.abs(read - sim.pet_suv).max() < 2e-3 * max(float(sim.pet_suv.max()), 1.0)


def test_out_of_distribution_content_under_a_t2fs_header(tmp_path):
    """What the input gate must catch: every kind passes the header rules as a sagittal T2FS."""
    from dicomnode.config import RulesConfig
    from dicomnode.rules import evaluate_paths
    from dicomnode.tools.phantom.generate import CONTENTS, _rotated

    def volume(record):
        return np.stack([pydicom.dcmread(p).pixel_array.astype(np.float64) for p in record["mr"]])

    base = write_case(tmp_path / "base", 7, rows=64, cols=64, slices=10)
    b = volume(base)
    seen = {}
    for kind in CONTENTS:
        record = write_case(tmp_path / kind, 7, rows=64, cols=64, slices=10, content=kind)
        (decision,) = evaluate_paths(RulesConfig(), [Path(p) for p in record["mr"]])
        assert decision.matched, (kind, decision.reason)
        assert pydicom.dcmread(record["mr"][0]).SeriesDescription == pydicom.dcmread(base["mr"][0]).SeriesDescription
        seen[kind] = volume(record)
        assert record["content"] == kind
    assert np.array_equal(seen["region"], _rotated(b.astype(np.uint16)).astype(np.float64))
    corr = {k: float(np.corrcoef(v.ravel(), b.ravel())[0, 1]) for k, v in seen.items()}
    assert corr["STIR"] > 0.95  # fat-suppressed and T2-like: close to T2FS by nature
    assert corr["T1"] < 0.3 and corr["T2"] < 0.6  # fat (and CSF for T1) change brightness

    def noise_sd(v):  # from neighbouring pixels' differences (robust to the anatomy's edges)
        d = np.diff(v, axis=2).ravel()
        return float(np.median(np.abs(d - np.median(d)))) / 0.6745 / np.sqrt(2)

    assert noise_sd(seen["noise"]) > 3 * noise_sd(b)  # the noise SD 6-10 times; texture is in both
    assert seen["inhomogeneity"].std() / seen["inhomogeneity"].mean() > 1.5 * b.std() / b.mean()
