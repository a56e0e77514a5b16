"""Pairs from the raw PT series: the same fusions as the workstation's where the geometry is the
same, close to them from a scanner's axial PET, every unconvertible study skipped with the tag
named, and a built data set that holds nothing identifying of its source."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode.tools.imagemetrics import psnr
from dicomnode.tools.phantom import generate
from training.data import build_dataset

pytest.importorskip("SimpleITK")

SMALL = dict(min_matrix=64, max_matrix=96, min_slices=8, max_slices=9)


@pytest.fixture(scope="module")
def scanner(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scanner") / "export"
    generate(out, 8, seed=21, lesion_fraction=0.5, **SMALL)
    return out


def _cases(export: Path) -> list[dict]:
    return json.loads((export / "cases.json").read_text())["cases"]


def _unit(a: np.ndarray) -> np.ndarray:
    return np.moveaxis(a.astype(np.float32) / 255.0, -1, 1)


def test_on_the_mr_grid_the_raw_road_redraws_the_workstation_fusion(tmp_path):
    """PET written on the MR's own slices: resampling is the identity, so the rendered fusion is the
    fusion SC to within the rounding of a float32 resample."""
    export = tmp_path / "export"
    generate(export, 3, seed=22, pet_grid="mr", **SMALL)
    raw = build_dataset(export, tmp_path / "raw", source="raw-pet")
    sc = build_dataset(export, tmp_path / "sc", source="fusion-sc")
    assert raw["counts"] == sc["counts"] and raw["skipped"] == []
    a, b = np.load(tmp_path / "raw" / "fusion.npy"), np.load(tmp_path / "sc" / "fusion.npy")
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.01
    assert raw["render"]["suv_window"] == [0.0, 7.0] and raw["resampling"]["library"].startswith("SimpleITK")


def test_scanner_pet_pairs_are_close_to_the_workstation_fusions(scanner, tmp_path):
    raw = build_dataset(scanner, tmp_path / "raw", source="raw-pet")
    sc = build_dataset(scanner, tmp_path / "sc", source="fusion-sc")
    assert raw["skipped"] == [] and raw["counts"]["pairs"] == sc["counts"]["pairs"] == sum(c["slices"] for c in _cases(scanner))
    with open(tmp_path / "raw" / "pairs.csv") as fa, open(tmp_path / "sc" / "pairs.csv") as fb:
        ra, rb = list(csv.DictReader(fa)), list(csv.DictReader(fb))
    assert [(r["phantom_case"], r["slice_index"]) for r in ra] == [(r["phantom_case"], r["slice_index"]) for r in rb]
    a, b = _unit(np.load(tmp_path / "raw" / "fusion.npy")), _unit(np.load(tmp_path / "sc" / "fusion.npy"))
    value = float(np.mean(psnr(a, b)))
    assert 28.0 < value < 60.0  # the same patient and uptake at the PET's resolution: close, not identical


def _rewrite(paths, fn) -> None:
    for path in paths:
        ds = pydicom.dcmread(path)
        fn(ds)
        ds.save_as(path, enforce_file_format=True)


def _set(**values):
    def fn(ds):
        for k, v in values.items():
            setattr(ds, k, v)
    return fn


def test_unconvertible_studies_are_skipped_with_the_tag_named(scanner, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(scanner, bad)
    cases = _cases(bad)
    pet = [[bad / p for p in c["pet"]] for c in cases]
    shutil.rmtree(bad / cases[0]["case_id"] / "PET")
    _rewrite(pet[1], _set(FrameOfReferenceUID="1.2.826.0.1.3680043.2.1125.9"))
    _rewrite(pet[2], _set(Units="CNTS"))
    _rewrite(pet[3], lambda ds: delattr(ds, "PatientWeight"))
    _rewrite(pet[4], lambda ds: (delattr(ds.RadiopharmaceuticalInformationSequence[0], "RadiopharmaceuticalStartDateTime"),
                                 setattr(ds.RadiopharmaceuticalInformationSequence[0], "RadiopharmaceuticalStartTime",
                                         "235500")))
    _rewrite(pet[5][:1], _set(PatientWeight="99.0"))
    keep = len(pet[6]) // 2  # the upper half of the PET is missing
    for p in pet[6][keep:]:
        p.unlink()
    m = build_dataset(bad, tmp_path / "data", source="raw-pet")
    reasons = sorted(s["reason"] for s in m["skipped"])
    want = ["no PT series in study", "FrameOfReferenceUID (0020,0052)", "(7053,1000)", "PatientWeight (0010,1030)",
            "RadiopharmaceuticalStartTime (0018,1072)", "inconsistent slices", "covers"]
    assert len(reasons) == len(want), reasons
    for w in want:
        assert sum(w in r for r in reasons) == 1, (w, reasons)
    with open(tmp_path / "data" / "pairs.csv") as fh:
        assert {r["phantom_case"] for r in csv.DictReader(fh)} == {cases[7]["case_id"]}


def _identifying(export: Path) -> set[str]:
    """Every name, ID, accession number, date and UID of the source export."""
    values: set[str] = set()
    for path in export.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for elem in ds.iterall():
            if elem.VR in ("UI", "DA", "DT", "PN", "LO", "SH") and elem.value not in (None, ""):
                if elem.VR == "UI" and str(elem.value).startswith("1.2.840.10008."):
                    continue  # standard SOP class and transfer syntax UIDs identify no one
                if elem.VR in ("LO", "SH") and elem.keyword not in ("PatientID", "AccessionNumber", "IssuerOfPatientID",
                                                                     "StudyID", "OtherPatientIDs"):
                    continue
                values.add(str(elem.value))
    values |= {v for v in values if "^" in v for v in v.split("^")}  # name components on their own
    return {v for v in values if len(v) >= 4}


def test_a_built_data_set_holds_nothing_identifying(scanner, tmp_path):
    ident = _identifying(scanner)
    assert {"PHS21P0000", "PHANTOM"} <= ident and len(ident) > 1000
    key = tmp_path / "site.key"
    for source in ("raw-pet", "fusion-sc"):
        out = tmp_path / source
        build_dataset(scanner, out, source=source, site_key=key)
        for f in out.rglob("*"):
            data = f.read_bytes()
            hits = [v for v in ident if v.encode() in data]
            assert not hits, (f.name, hits[:5])
        key_map = tmp_path / f"{source}.key-map.csv"
        assert key_map.stat().st_mode & 0o777 == 0o600 and key.stat().st_mode & 0o777 == 0o600
        assert "PHS21P0000" in key_map.read_text()
    # the same key gives the same pseudonyms; another key gives others
    a = (tmp_path / "raw-pet" / "pairs.csv").read_text()
    build_dataset(scanner, tmp_path / "again", source="raw-pet", site_key=key)
    assert (tmp_path / "again" / "pairs.csv").read_text() == a
    build_dataset(scanner, tmp_path / "other", source="raw-pet", site_key=tmp_path / "other.key")
    first = lambda text: text.splitlines()[1].split(",")[1]  # noqa: E731
    assert first((tmp_path / "other" / "pairs.csv").read_text()) != first(a)
    with pytest.raises(ValueError, match="must not lie inside"):
        build_dataset(scanner, tmp_path / "x", site_key=key, key_map=tmp_path / "x" / "map.csv")
    assert not os.access(tmp_path / "x" / "map.csv", os.F_OK)
