"""Paired-dataset builder: contract files, patient-level split, broken-pair rejection, no mis-pairing."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode.infer.grid import GridPlacement
from dicomnode.tools.phantom import generate
from training.__main__ import main as training_main
from training.data import PairedDataset, build_dataset, default_site_key, split_patients
from training.deid import Pseudonymizer, load_or_create_key

TINY = dict(min_matrix=64, max_matrix=96, min_slices=3, max_slices=4)


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "phantom"
    generate(out, 10, seed=5, lesion_fraction=0.5, **TINY)
    return out


@pytest.fixture(scope="module")
def built(export, tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("data")
    assert training_main(["build-dataset", "--export", str(export), "--out", str(data), "--seed", "3"]) == 0
    return data


def _pairs(data: Path) -> list[dict]:
    with open(data / "pairs.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _cases(export: Path) -> list[dict]:
    return json.loads((export / "cases.json").read_text())["cases"]


def _pseudo() -> Pseudonymizer:
    """The pseudonyms build-dataset gives with the tests' site key."""
    return Pseudonymizer(load_or_create_key(default_site_key()))


def test_contract_files(built, export):
    m = json.loads((built / "manifest.json").read_text())
    cases = _cases(export)
    n = sum(c["slices"] for c in cases)
    assert m["format"] == "dicomnode-paired/1" and m["grid"] == 256 and m["seed"] == 3
    assert m["counts"]["pairs"] == n and m["skipped"] == []
    assert m["counts"]["patients"] == len({c["patient_id"] for c in cases})
    assert m["counts"]["train"] + m["counts"]["val"] + m["counts"]["test"] == n
    mr = np.load(built / "mr.npy", mmap_mode="r")
    fu = np.load(built / "fusion.npy", mmap_mode="r")
    assert mr.dtype == np.float16 and mr.shape == (n, 1, 256, 256)
    assert fu.dtype == np.uint8 and fu.shape == (n, 256, 256, 3)
    assert float(mr.min()) >= -1 and float(mr.max()) <= 1
    rows = _pairs(built)
    assert [int(r["index"]) for r in rows] == list(range(n))
    by_case = {c["case_id"]: c for c in cases}
    for r in rows:
        c = by_case[r["phantom_case"]]
        assert r["study_uid"] == _pseudo().uid(c["study_uid"]) != c["study_uid"]
        assert r["lesion"] == str(int(c["lesion"]))
        assert (r["uptake"] == "") == (c["suv_max"] is None)


def test_split_is_patient_level_and_reproducible(built, export):
    m = json.loads((built / "manifest.json").read_text())
    sets = [set(m["splits"][s]) for s in ("train", "val", "test")]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert all(sets)
    for r in _pairs(built):
        assert r["patient_id"] in m["splits"][r["split"]]
    pids = sorted({c["patient_id"] for c in _cases(export)})
    clear = split_patients(pids, 3)  # drawn on the patients, then pseudonymised
    assert {k: sorted(_pseudo().patient(p, "PHANTOM") for p in v) for k, v in clear.items()} == m["splits"]
    many = split_patients([f"p{i}" for i in range(94)], 0)
    assert [len(many[s]) for s in ("train", "val", "test")] == [76, 9, 9]
    wide = split_patients([f"p{i}" for i in range(94)], 0, val=0.15, test=0.2)  # a small site holds out more
    assert [len(wide[s]) for s in ("train", "val", "test")] == [61, 14, 19]
    assert set(wide["test"]) | set(wide["val"]) | set(wide["train"]) == {f"p{i}" for i in range(94)}
    for bad in ((0.0, 0.1), (0.5, 0.5), (0.1, 1.2)):
        with pytest.raises(ValueError, match="fractions"):
            split_patients(pids, 0, *bad)


def test_pairs_match_the_referenced_mr_slice(built, export):
    """Every fusion row in fusion.npy is the SC that references the MR slice at that position."""
    rows = _pairs(built)
    fu = np.load(built / "fusion.npy", mmap_mode="r")
    for c in _cases(export)[:4]:
        mine = [r for r in rows if r["phantom_case"] == c["case_id"]]
        pos = [float(r["position_mm"]) for r in mine]
        assert pos == sorted(pos) and len(mine) == c["slices"]
        for r in mine:
            sc = pydicom.dcmread(export / c["fusion"][int(r["slice_index"])])
            mr = pydicom.dcmread(export / c["mr"][int(r["slice_index"])])
            assert sc.ReferencedImageSequence[0].ReferencedSOPInstanceUID == mr.SOPInstanceUID
            assert float(mr.SliceLocation) == pytest.approx(float(r["position_mm"]), abs=1e-3)
            place = GridPlacement.for_image(mr.Rows, mr.Columns, tuple(float(v) for v in mr.PixelSpacing))
            want = np.rint(np.moveaxis(place.to_grid(np.moveaxis(sc.pixel_array, -1, 0).astype(np.float32),
                                                     fill=0.0), 0, -1))
            assert np.array_equal(fu[int(r["index"])], want.astype(np.uint8))


def test_paired_dataset_items(built):
    torch = pytest.importorskip("torch")
    total = 0
    for split in ("train", "val", "test"):
        ds = PairedDataset(built, split)
        total += len(ds)
        mr, fusion, idx = ds[0]
        assert mr.dtype == torch.float32 and mr.shape == (1, 256, 256)
        assert fusion.dtype == torch.float32 and fusion.shape == (3, 256, 256)
        assert -1 <= float(mr.min()) and float(mr.max()) <= 1
        assert -1 <= float(fusion.min()) and float(fusion.max()) <= 1
        assert isinstance(idx, int)
    assert total == len(PairedDataset(built, None))
    loader = torch.utils.data.DataLoader(PairedDataset(built, "train"), batch_size=2, num_workers=0)
    mr, fusion, idx = next(iter(loader))
    assert mr.shape == (2, 1, 256, 256)


def _rewrite(path: Path, fn) -> None:
    ds = pydicom.dcmread(path)
    fn(ds)
    ds.save_as(path, enforce_file_format=True)


def test_broken_pairs_are_reported_and_skipped(export, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(export, bad)
    cases = _cases(export)
    by_reason = {}
    # 0: a missing MR slice
    (bad / cases[0]["mr"][1]).unlink()
    by_reason[cases[0]["study_uid"]] = "missing slices"
    # 1: a missing fusion image
    (bad / cases[1]["fusion"][0]).unlink()
    by_reason[cases[1]["study_uid"]] = "different slice counts"
    # 2: fusion filed under another study
    for p in cases[2]["fusion"]:
        _rewrite(bad / p, lambda ds: setattr(ds, "StudyInstanceUID", "1.2.3.4.5.6.7"))
    by_reason["1.2.3.4.5.6.7"] = "different studies"
    # 3: fusion exported with another aspect ratio (cropped)
    def crop(ds):
        arr = ds.pixel_array[: ds.Rows // 2]
        ds.Rows = arr.shape[0]
        ds.PixelData = np.ascontiguousarray(arr).tobytes()
    for p in cases[3]["fusion"]:
        _rewrite(bad / p, crop)
    by_reason[cases[3]["study_uid"]] = "mismatched geometry"
    m = build_dataset(bad, tmp_path / "data", seed=0)
    reasons = {s["study_uid"]: s["reason"] for s in m["skipped"]}
    p = _pseudo()
    for study, why in by_reason.items():
        assert p.uid(study) in reasons and reasons[p.uid(study)].startswith(why), (study, reasons.get(p.uid(study)))
    assert reasons[p.uid(cases[2]["study_uid"])] == "no fusion series in study"
    kept = {r["phantom_case"] for r in _pairs(tmp_path / "data")}
    assert kept == {c["case_id"] for c in cases[4:]}
    assert m["counts"]["pairs"] == sum(c["slices"] for c in cases[4:])


def test_pairing_by_position_without_references(export, tmp_path):
    """A workstation export without references, in scrambled order, still pairs slice k with slice k."""
    hosp = tmp_path / "hosp"
    c = _cases(export)[0]
    shutil.copytree(export / c["case_id"], hosp / "x")
    mrs = [pydicom.dcmread(export / p) for p in c["mr"]]
    n = len(mrs)
    for k, p in enumerate(c["fusion"]):
        m = mrs[k]

        def strip(ds, m=m, k=k):
            del ds.ReferencedImageSequence
            del ds.SourceImageSequence
            ds.ImagePositionPatient = m.ImagePositionPatient
            ds.ImageOrientationPatient = m.ImageOrientationPatient
            ds.FrameOfReferenceUID = m.FrameOfReferenceUID
            ds.InstanceNumber = n - k  # reversed numbering
        target = hosp / "x" / "FUSION" / Path(p).name
        _rewrite(target, strip)
        target.rename(hosp / "x" / "FUSION" / f"img{(k * 7) % n}_{k}")
    m = build_dataset(hosp, tmp_path / "data", seed=0)
    assert m["counts"]["pairs"] == n and m["skipped"] == []
    fu = np.load(tmp_path / "data" / "fusion.npy")
    ref = build_dataset(export, tmp_path / "ref", seed=0)
    ref_rows = [r for r in _pairs(tmp_path / "ref") if r["phantom_case"] == c["case_id"]]
    ref_fu = np.load(tmp_path / "ref" / "fusion.npy")
    assert ref["counts"]["pairs"] >= n
    for k, r in enumerate(ref_rows):
        assert np.array_equal(fu[k], ref_fu[int(r["index"])])
    # Without a position either, nothing is guessed.
    for f in (hosp / "x" / "FUSION").iterdir():
        _rewrite(f, lambda ds: delattr(ds, "ImagePositionPatient"))
    m2 = build_dataset(hosp, tmp_path / "data2", seed=0)
    assert m2["counts"]["pairs"] == 0 and m2["skipped"][0]["reason"].startswith("cannot place")
