"""Paired data set: T2FS slices and their PET/T2FS fusion images, on the model grid.

`build_dataset` reads an export folder (the phantom's, or a hospital's) and pairs every T2FS
slice with a fusion image, from one of two sources:

- `fusion-sc`: fusion Secondary Capture series a workstation rendered, matched to their MR
  slices by reference or position;
- `raw-pet`: the PT series itself, on the MR's Frame of Reference, converted to SUV and
  resampled onto each MR slice (`training.rawpet`), the MR series chosen by the node's rules.

Broken or unconvertible studies are skipped with their reason (never guessed). The split is by
patient, 8:1:1 unless the val and test fractions are given. What is written holds no names, IDs,
accession numbers, dates or original UIDs (`training.deid`): manifest.json, mr.npy (N,1,256,256
float16), fusion.npy (N,256,256,3 uint8), pairs.csv (docs/user-guide/research/paired-dataset.md);
the key map goes to its own path.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicomnode.geometry import ORIENTATION_TOL, GeometryError, make_geometry, stack_of
from dicomnode.infer.grid import MODEL_GRID, GridPlacement, normalize_series, rgb_to_unit
from training.deid import Pseudonymizer, load_or_create_key

log = logging.getLogger(__name__)

FORMAT = "dicomnode-paired/1"
SOURCES = ("fusion-sc", "raw-pet")
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
PET_STORAGE = "1.2.840.10008.5.1.4.1.1.128"
SC_STORAGE = {"1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.4"}  # SC, multi-frame true colour SC
SPLITS = ("train", "val", "test")
ASPECT_TOL = 0.02


@dataclass
class Inst:
    """Header of one exported image (pixels are read only for kept pairs)."""

    path: Path
    sop_uid: str
    sop_class: str
    study_uid: str
    series_uid: str
    patient_id: str
    rows: int
    cols: int
    samples: int
    spacing: tuple[float, ...] | None
    iop: tuple[float, ...] | None
    ipp: tuple[float, ...] | None
    instance_number: int
    frame_uid: str
    images_in_acquisition: int | None
    refs: list[str] = field(default_factory=list)
    header: Dataset | None = None  # without pixels: for the rules, SUV and the key map
    burned_in: bool = False

    def position(self, normal: np.ndarray) -> float | None:
        return None if self.ipp is None else float(np.dot(self.ipp, normal))


def _floats(v, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(x) for x in v)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def read_header(path: Path) -> Inst | None:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError):
        return None
    if "SOPInstanceUID" not in ds or "StudyInstanceUID" not in ds or "SeriesInstanceUID" not in ds:
        return None
    refs = []
    for key in ("ReferencedImageSequence", "SourceImageSequence"):
        for item in ds.get(key, []):
            if item.get("ReferencedSOPClassUID", "") == MR_STORAGE and "ReferencedSOPInstanceUID" in item:
                refs.append(str(item.ReferencedSOPInstanceUID))
    iia = ds.get("ImagesInAcquisition")
    return Inst(path=path, sop_uid=str(ds.SOPInstanceUID), sop_class=str(ds.get("SOPClassUID", "")),
                study_uid=str(ds.StudyInstanceUID), series_uid=str(ds.SeriesInstanceUID),
                patient_id=str(ds.get("PatientID", "")), rows=int(ds.get("Rows", 0)), cols=int(ds.get("Columns", 0)),
                samples=int(ds.get("SamplesPerPixel", 1)), spacing=_floats(ds.get("PixelSpacing"), 2),
                iop=_floats(ds.get("ImageOrientationPatient"), 6), ipp=_floats(ds.get("ImagePositionPatient"), 3),
                instance_number=int(ds.get("InstanceNumber", 0) or 0), frame_uid=str(ds.get("FrameOfReferenceUID", "")),
                images_in_acquisition=int(iia) if iia not in (None, "") else None, refs=list(dict.fromkeys(refs)),
                header=ds, burned_in=str(ds.get("BurnedInAnnotation", "")).upper() == "YES")


@dataclass
class PairedStudy:
    """One MR series (sorted by position) and its fusion source: a fusion SC series matched slice by
    slice, or (`pet`) the PT series the fusions are rendered from."""

    study_uid: str
    patient_id: str
    mr: list[Inst]
    fusion: list[Inst]
    positions: list[float]
    pet: list[Inst] | None = None


class BrokenPair(Exception):
    """A fusion series that cannot be paired safely; the message is the reported reason."""


def _normal(iop: Sequence[float]) -> np.ndarray:
    n = np.cross(np.asarray(iop[:3]), np.asarray(iop[3:]))
    return n / np.linalg.norm(n)


def _check_mr(mr: list[Inst]) -> tuple[list[Inst], list[float]]:
    """MR series sorted along its normal; raise BrokenPair on inconsistent or gappy series (the
    node's own geometry checks, `dicomnode.geometry`)."""
    first = mr[0]
    try:
        stack = stack_of([make_geometry(m.rows, m.cols, m.spacing, m.ipp, m.iop) for m in mr],
                         [f"MR slice #{m.instance_number}" for m in mr])
    except GeometryError as exc:
        kind = "missing slices" if "uneven" in str(exc) else "mismatched geometry"
        raise BrokenPair(f"{kind}: {exc}") from None
    ordered, pos = [mr[i] for i in stack.order], list(stack.locations)
    expected = first.images_in_acquisition
    if expected and expected > len(mr):
        raise BrokenPair(f"missing slices: MR series has {len(mr)} of {expected} images")
    return ordered, pos


def pair_series(fusion: list[Inst], mr_by_sop: dict[str, Inst], series: dict[str, list[Inst]]) -> PairedStudy:
    """Match one fusion series to its MR slices, or raise BrokenPair with the reason."""
    study = fusion[0].study_uid
    if len({f.study_uid for f in fusion}) > 1:
        raise BrokenPair("different studies: fusion series spans several studies")
    refs = [f.refs[0] if f.refs else None for f in fusion]
    referenced = [r for r in refs if r is not None]
    if len(referenced) == len(refs):
        targets = {mr_by_sop[r].series_uid for r in referenced if r in mr_by_sop}
        if not targets:
            raise BrokenPair("missing slices: referenced MR images are not in the export")
        if len(targets) > 1:
            raise BrokenPair("mismatched geometry: fusion images reference several MR series")
        mr_all = series[targets.pop()]
        if mr_all[0].study_uid != study:
            raise BrokenPair("different studies: fusion and referenced MR belong to different studies")
        if any(r not in mr_by_sop for r in referenced):
            raise BrokenPair("missing slices: some referenced MR images are not in the export")
        mr, pos = _check_mr(mr_all)
        index = {m.sop_uid: i for i, m in enumerate(mr)}
        slot = [index[r] for r in referenced]
    elif all(f.ipp is not None and f.iop is not None for f in fusion):
        # No references (some workstations): match by position within the same frame of reference.
        plane = fusion[0].iop
        cands = [s for s in series.values() if s[0].study_uid == study and s[0].sop_class == MR_STORAGE
                 and s[0].frame_uid == fusion[0].frame_uid and s[0].iop is not None and plane is not None
                 and np.allclose(s[0].iop, plane, atol=ORIENTATION_TOL)]
        if len(cands) != 1:
            raise BrokenPair(f"cannot place fusion images: {len(cands)} MR series share their plane")
        mr, pos = _check_mr(cands[0])
        n = _normal(mr[0].iop or ())
        tol = 0.25 * (float(np.median(np.diff(pos))) if len(pos) > 1 else 1.0)
        slot = []
        for f in fusion:
            d = np.abs(np.asarray(pos) - f.position(n))
            if d.min() > tol:
                raise BrokenPair("missing slices: a fusion image lies on no MR slice")
            slot.append(int(d.argmin()))
    else:
        raise BrokenPair("cannot place fusion images: no MR reference and no position")
    if len(fusion) != len(mr):
        raise BrokenPair(f"different slice counts: MR {len(mr)}, fusion {len(fusion)}")
    if len(set(slot)) != len(slot):
        raise BrokenPair("mismatched geometry: two fusion images on one MR slice")
    if {f.patient_id for f in fusion} != {mr[0].patient_id}:
        raise BrokenPair("different studies: fusion and MR patient IDs differ")
    m0 = mr[0]
    for f in fusion:
        if f.burned_in:
            raise BrokenPair("BurnedInAnnotation (0028,0301) is YES: the pixels may carry identifying text")
        if f.samples != 3:
            raise BrokenPair("mismatched geometry: fusion image is not RGB")
        if abs((f.rows / f.cols) / (m0.rows / m0.cols) - 1) > ASPECT_TOL:
            raise BrokenPair(f"mismatched geometry: fusion {f.rows}x{f.cols} vs MR {m0.rows}x{m0.cols}")
    ordered: list[Inst | None] = [None] * len(mr)
    for f, k in zip(fusion, slot):
        ordered[k] = f
    return PairedStudy(study, m0.patient_id, mr, ordered, pos)  # type: ignore[arg-type]


def find_pairs(insts: list[Inst]) -> tuple[list[PairedStudy], list[dict]]:
    """All pairable fusion series of an export, and the skipped ones with their reasons."""
    series: dict[str, list[Inst]] = defaultdict(list)
    for i in insts:
        series[i.series_uid].append(i)
    mr_by_sop = {i.sop_uid: i for i in insts if i.sop_class == MR_STORAGE}
    paired, skipped = [], []
    used_mr: set[str] = set()
    for uid in sorted(series):
        s = series[uid]
        if s[0].sop_class not in SC_STORAGE or s[0].samples != 3:
            continue
        s.sort(key=lambda f: (f.instance_number, f.sop_uid))
        try:
            p = pair_series(s, mr_by_sop, series)
        except BrokenPair as e:
            skipped.append({"study_uid": s[0].study_uid, "fusion_series_uid": uid, "reason": str(e)})
            continue
        if p.mr[0].series_uid in used_mr:
            skipped.append({"study_uid": p.study_uid, "fusion_series_uid": uid,
                            "reason": "duplicate: MR series already paired with another fusion series"})
            continue
        used_mr.add(p.mr[0].series_uid)
        paired.append(p)
    fused_studies = {i.study_uid for s in series.values() for i in s[:1]
                     if i.sop_class in SC_STORAGE and i.samples == 3}
    for st in sorted({i.study_uid for i in insts if i.sop_class == MR_STORAGE} - fused_studies):
        skipped.append({"study_uid": st, "reason": "no fusion series in study"})
    paired.sort(key=lambda p: (p.patient_id, p.study_uid))
    return paired, skipped


def find_pet_pairs(insts: list[Inst]) -> tuple[list[PairedStudy], list[dict]]:
    """Per study: the one MR series the node's rules select and the one PT series on its Frame of
    Reference whose header allows SUV; every other study is skipped with its reason."""
    from dicomnode.config import RulesConfig
    from dicomnode.rules import evaluate
    from dicomnode.tools.suv import SuvError, series_scale

    rules = RulesConfig()
    by_study: dict[str, dict[str, list[Inst]]] = defaultdict(lambda: defaultdict(list))
    for i in insts:
        by_study[i.study_uid][i.series_uid].append(i)
    paired, skipped = [], []
    for study in sorted(by_study):
        series = by_study[study]

        def skip(reason: str, study: str = study) -> None:
            skipped.append({"study_uid": study, "reason": reason})

        mr_series = [s for s in series.values() if s[0].sop_class == MR_STORAGE]
        chosen = [s for s in mr_series if evaluate(rules, s[0].series_uid, [m.header for m in s if m.header]).matched]
        if len(chosen) != 1:
            skip("no sagittal T2FS series (the node's rules)" if not chosen else
                 f"{len(chosen)} series pass the node's rules: cannot tell which to pair")
            continue
        mr_all = chosen[0]
        pts = [s for s in series.values() if s[0].sop_class == PET_STORAGE]
        if not pts:
            skip("no PT series in study")
            continue
        same_frame = [s for s in pts if s[0].frame_uid and s[0].frame_uid == mr_all[0].frame_uid]
        if not same_frame:
            skip("PT series on another Frame of Reference: FrameOfReferenceUID (0020,0052) differs from the MR's")
            continue
        usable, reasons = [], []
        for s in same_frame:
            try:
                series_scale([x.header for x in s if x.header])
                usable.append(s)
            except SuvError as exc:
                reasons.append(str(exc))
        if len(usable) != 1:
            skip(f"PT: {reasons[0]}" if not usable else f"{len(usable)} PT series allow SUV: cannot tell which to pair")
            continue
        try:
            mr, pos = _check_mr(mr_all)
        except BrokenPair as exc:
            skip(str(exc))
            continue
        if {i.patient_id for i in usable[0]} != {mr[0].patient_id}:
            skip("different patients: PT and MR patient IDs differ")
            continue
        paired.append(PairedStudy(study, mr[0].patient_id, mr, [], pos, pet=usable[0]))
    paired.sort(key=lambda p: (p.patient_id, p.study_uid))
    return paired, skipped


def split_patients(patients: Sequence[str], seed: int, val: float = 0.1, test: float = 0.1) -> dict[str, list[str]]:
    """Train, val and test at patient level (8:1:1 by default), reproducible from the seed (at
    least one val/test patient when there are enough patients)."""
    if not (0 < val < 1 and 0 < test < 1 and val + test < 1):
        raise ValueError(f"val and test fractions must be in (0, 1) and sum to less than 1 (got {val}, {test})")
    pts = sorted(set(patients))
    order = [pts[i] for i in np.random.default_rng(seed).permutation(len(pts))]
    n = len(pts)
    n_test = max(1, round(n * test)) if n >= 2 else 0
    n_val = max(1, round(n * val)) if n >= 3 else 0
    return {"test": sorted(order[:n_test]), "val": sorted(order[n_test:n_test + n_val]),
            "train": sorted(order[n_test + n_val:])}


def _case_info(export: Path) -> dict[str, dict]:
    f = export / "cases.json"
    if not f.exists():
        return {}
    return {c["study_uid"]: c for c in json.loads(f.read_text()).get("cases", [])}


def default_site_key() -> Path:
    """$DICOMNODE_SITE_KEY, else ~/.config/dicomnode/site.key (created on first use, 0600)."""
    env = os.environ.get("DICOMNODE_SITE_KEY")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "dicomnode" / "site.key"


def _fusion_grid(p: PairedStudy, k: int, raw_mr: np.ndarray, rendered: np.ndarray | None, size: int) -> np.ndarray:
    """Fusion k of a study on the model grid: from its SC, or from the rendered raw-PET fusion."""
    m0 = p.mr[0]
    assert m0.spacing is not None
    if rendered is not None:
        rgb, rows, cols = rendered[k], m0.rows, m0.cols
    else:
        f = p.fusion[k]
        rgb, rows, cols = pydicom.dcmread(f.path).pixel_array, f.rows, f.cols
    place = GridPlacement.for_image(rows, cols, (m0.spacing[0] * m0.rows / rows, m0.spacing[1] * m0.cols / cols),
                                    size=size)
    grid_rgb = place.to_grid(np.moveaxis(rgb, -1, 0).astype(np.float32), fill=0.0)
    return np.clip(np.rint(np.moveaxis(grid_rgb, 0, -1)), 0, 255).astype(np.uint8)


def build_dataset(export: str | Path, out: str | Path, seed: int = 0, size: int = MODEL_GRID, *,
                  source: str = "fusion-sc", site_key: str | Path | None = None,
                  key_map: str | Path | None = None, val_fraction: float = 0.1,
                  test_fraction: float = 0.1) -> dict:
    """Scan `export`, pair, split, de-identify and write the data set to `out`; return the manifest.

    The key map (pseudonyms -> original IDs and UIDs) goes to `key_map`, by default
    OUT.key-map.csv beside the data set folder, never inside it."""
    from training.rawpet import PetRefused, fusion_slices, pet_volume, render_settings, resampling_settings

    export, out = Path(export), Path(out)
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}")
    split_patients([], seed, val_fraction, test_fraction)  # refuse bad fractions before the long scan
    map_path = Path(key_map) if key_map is not None else out.with_name(out.name + ".key-map.csv")
    if map_path.resolve().is_relative_to(out.resolve()):
        raise ValueError(f"the key map {map_path} must not lie inside the data set {out}")
    pseudo = Pseudonymizer(load_or_create_key(Path(site_key) if site_key is not None else default_site_key()))
    insts = [h for p in sorted(export.rglob("*")) if p.is_file() and p.name != "DICOMDIR"
             and p.suffix.lower() not in (".json", ".png", ".csv", ".npy") and (h := read_header(p)) is not None]
    paired, skipped = find_pairs(insts) if source == "fusion-sc" else find_pet_pairs(insts)
    info = _case_info(export)
    n_max = sum(len(p.mr) for p in paired)
    out.mkdir(parents=True, exist_ok=True)
    mr_arr = np.lib.format.open_memmap(out / "mr.tmp.npy", mode="w+", dtype=np.float16, shape=(n_max, 1, size, size))
    fu_arr = np.lib.format.open_memmap(out / "fusion.tmp.npy", mode="w+", dtype=np.uint8, shape=(n_max, size, size, 3))
    rows: list[dict] = []
    kept: list[PairedStudy] = []
    for p in paired:
        m0 = p.mr[0]
        mr_ds = [pydicom.dcmread(m.path) for m in p.mr]
        raw = np.stack([d.pixel_array for d in mr_ds])
        rendered = None
        if p.pet is not None:
            try:
                rendered = fusion_slices(mr_ds, raw, pet_volume([pydicom.dcmread(x.path) for x in p.pet]))
            except PetRefused as exc:
                skipped.append({"study_uid": p.study_uid, "reason": str(exc)})
                continue
        if m0.spacing is None:
            skipped.append({"study_uid": p.study_uid, "reason": "mismatched geometry: the MR has no Pixel Spacing"})
            continue
        kept.append(p)
        vol = normalize_series(raw)
        place = GridPlacement.for_image(m0.rows, m0.cols, (m0.spacing[0], m0.spacing[1]), size=size)
        case = info.get(p.study_uid, {})
        head = m0.header
        study = pseudo.uid(p.study_uid, "study", patient_pseudonym=pseudo.patient(p.patient_id, _issuer(m0)),
                           accession_number=str(head.get("AccessionNumber", "")) if head else "",
                           study_date=str(head.get("StudyDate", "")) if head else "")
        src_series = p.pet[0].series_uid if p.pet is not None else p.fusion[0].series_uid
        for k, m in enumerate(p.mr):
            i = len(rows)
            mr_arr[i, 0] = place.to_grid(vol[k], fill=-1.0).astype(np.float16)
            fu_arr[i] = _fusion_grid(p, k, raw, rendered, size)
            rows.append({"index": i, "patient_id": p.patient_id, "study_uid": study,
                         "mr_series_uid": pseudo.uid(m.series_uid, "series"),
                         "fusion_series_uid": pseudo.uid(src_series, "series"), "slice_index": k,
                         "position_mm": f"{p.positions[k]:.3f}",
                         "uptake": "" if case.get("suv_max") is None else case["suv_max"],
                         "lesion": "" if "lesion" not in case else int(bool(case["lesion"])),
                         "phantom_case": case.get("case_id", "")})
    n = len(rows)
    _shrink(out, "mr", mr_arr, n)
    _shrink(out, "fusion", fu_arr, n)
    del mr_arr, fu_arr
    # The split is drawn on the original patients (as before de-identification), then pseudonymised.
    splits_clear = split_patients([p.patient_id for p in kept], seed, val_fraction, test_fraction)
    split_of = {pid: name for name, pids in splits_clear.items() for pid in pids}
    issuer = {p.patient_id: _issuer(p.mr[0]) for p in kept}
    for r in rows:
        r["split"] = split_of[r["patient_id"]]
        r["patient_id"] = pseudo.patient(r["patient_id"], issuer[r["patient_id"]])
    with open(out / "pairs.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["index", "patient_id", "study_uid", "mr_series_uid", "fusion_series_uid",
                                           "slice_index", "position_mm", "uptake", "lesion", "phantom_case", "split"])
        w.writeheader()
        w.writerows(rows)
    for s in skipped:
        s["study_uid"] = pseudo.uid(s["study_uid"], "study")
        if "fusion_series_uid" in s:
            s["fusion_series_uid"] = pseudo.uid(s["fusion_series_uid"], "series")
    counts = {"pairs": n, "patients": len(split_of), "studies": len(kept)}
    years = sorted({str(p.mr[0].header.get("StudyDate", ""))[:4] for p in kept if p.mr[0].header is not None} - {""})
    counts.update({sp: sum(1 for r in rows if r["split"] == sp) for sp in SPLITS})
    splits = {name: sorted(pseudo.patient(pid, issuer[pid]) for pid in pids) for name, pids in splits_clear.items()}
    manifest = {"format": FORMAT, "grid": size, "seed": seed, "source": source, "counts": counts,
                "split_fractions": {"val": val_fraction, "test": test_fraction},
                "splits": splits, "skipped": skipped, "render": render_settings(),
                "deidentification": {"profile": "DICOM PS3.15 Annex E Basic Application Level Confidentiality "
                                                "Profile: no names, IDs, accession numbers, dates or original UIDs",
                                     "pseudonyms": "HMAC-SHA256 with the site key", "key_map": "kept apart"},
                "study_years": [int(y) for y in years if y.isdigit()],  # years only, as provenance
                "created_year": datetime.now(timezone.utc).year}
    if source == "raw-pet":
        manifest["resampling"] = resampling_settings()
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    pseudo.write_map(map_path)
    log.info("paired %d slices from %d studies; skipped %d studies or series", n, len(kept), len(skipped))
    return manifest


def _issuer(m: Inst) -> str:
    return str(m.header.get("IssuerOfPatientID", "")) if m.header is not None else ""


def _shrink(out: Path, name: str, arr: np.memmap, n: int) -> None:
    """Move the first n rows of the temporary array to OUT/name.npy."""
    arr.flush()
    if n == arr.shape[0]:
        os.replace(out / f"{name}.tmp.npy", out / f"{name}.npy")
        return
    final = np.lib.format.open_memmap(out / f"{name}.npy", mode="w+", dtype=arr.dtype, shape=(n, *arr.shape[1:]))
    for a in range(0, n, 256):
        final[a:a + 256] = arr[a:min(a + 256, n)]
    final.flush()
    del final
    os.unlink(out / f"{name}.tmp.npy")


class PairedDataset:
    """Contract reader: yields (mr (1,H,W), fusion (3,H,W), index), float32 tensors in [-1, 1].

    The arrays are opened memory-mapped lazily, once per process, so DataLoader workers share the
    page cache instead of copying the data set.
    """

    def __init__(self, data_dir: str | Path, split: str | None = "train"):
        self.dir = Path(data_dir)
        manifest = json.loads((self.dir / "manifest.json").read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{self.dir}: not a {FORMAT} data set")
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} or None")
        with open(self.dir / "pairs.csv", newline="") as fh:
            self.indices = [int(r["index"]) for r in csv.DictReader(fh) if split is None or r["split"] == split]
        self.manifest = manifest
        self._mr: np.ndarray | None = None
        self._fusion: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_mr"] = state["_fusion"] = None
        return state

    def __getitem__(self, i: int):
        import torch

        if self._mr is None:
            self._mr = np.load(self.dir / "mr.npy", mmap_mode="r")
            self._fusion = np.load(self.dir / "fusion.npy", mmap_mode="r")
        assert self._fusion is not None
        idx = self.indices[i]
        mr = torch.from_numpy(np.asarray(self._mr[idx], dtype=np.float32))
        fusion = torch.from_numpy(rgb_to_unit(self._fusion[idx]))
        return mr, fusion, idx


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training build-dataset", description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--export", required=True, type=Path, help="export folder (phantom or hospital)")
    ap.add_argument("--out", required=True, type=Path, help="data set folder to write")
    ap.add_argument("--from", dest="source", choices=SOURCES, default="fusion-sc",
                    help="fusions from rendered fusion SC series, or rendered here from the raw PT series")
    ap.add_argument("--seed", type=int, default=0, help="seed of the patient-level split")
    ap.add_argument("--val-fraction", type=float, default=0.1, help="share of the patients in the val split")
    ap.add_argument("--test-fraction", type=float, default=0.1, help="share of the patients in the test split")
    ap.add_argument("--site-key", type=Path, default=None,
                    help="site secret for the pseudonyms (created if absent; default $DICOMNODE_SITE_KEY or "
                         "~/.config/dicomnode/site.key)")
    ap.add_argument("--key-map", type=Path, default=None,
                    help="where the pseudonym -> original map goes (default OUT.key-map.csv, mode 0600)")
    a = ap.parse_args(argv)
    try:
        m = build_dataset(a.export, a.out, a.seed, source=a.source, site_key=a.site_key, key_map=a.key_map,
                          val_fraction=a.val_fraction, test_fraction=a.test_fraction)
    except ValueError as exc:
        print(f"build-dataset: {exc}", file=sys.stderr)
        return 2
    c = m["counts"]
    print(f"{c['pairs']} pairs from {c['studies']} studies of {c['patients']} patients (train {c['train']}, "
          f"val {c['val']}, test {c['test']}); {len(m['skipped'])} skipped -> {a.out}")
    for s in m["skipped"]:
        print(f"  skipped study {s['study_uid']}: {s['reason']}")
    return 0
