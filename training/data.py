"""Paired data set: T2FS slices and their PET/T2FS fusion images, on the model grid.

`build_dataset` reads an export folder (the phantom's, or a hospital's export of sagittal T2FS
series and fusion Secondary Capture series), pairs each fusion image with its MR slice by study
and slice position, skips and reports broken pairs (never guesses), splits 8:1:1 by patient,
and writes the files of the paired-dataset contract (docs/user-guide/research/paired-dataset.md):
manifest.json, mr.npy (N,1,256,256 float16), fusion.npy (N,256,256,3 uint8), pairs.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from dicomnode.geometry import ORIENTATION_TOL, GeometryError, make_geometry, stack_of
from dicomnode.infer.grid import MODEL_GRID, GridPlacement, normalize_series, rgb_to_unit

log = logging.getLogger(__name__)

FORMAT = "dicomnode-paired/1"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
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
                images_in_acquisition=int(iia) if iia not in (None, "") else None, refs=list(dict.fromkeys(refs)))


@dataclass
class PairedStudy:
    """One fusion series matched slice by slice to one MR series (both sorted by MR position)."""

    study_uid: str
    patient_id: str
    mr: list[Inst]
    fusion: list[Inst]
    positions: list[float]


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


def split_patients(patients: Sequence[str], seed: int) -> dict[str, list[str]]:
    """8:1:1 at patient level, reproducible from the seed (at least one val/test patient when
    there are enough patients)."""
    pts = sorted(set(patients))
    order = [pts[i] for i in np.random.default_rng(seed).permutation(len(pts))]
    n = len(pts)
    n_test = max(1, round(n / 10)) if n >= 2 else 0
    n_val = max(1, round(n / 10)) if n >= 3 else 0
    return {"test": sorted(order[:n_test]), "val": sorted(order[n_test:n_test + n_val]),
            "train": sorted(order[n_test + n_val:])}


def _case_info(export: Path) -> dict[str, dict]:
    f = export / "cases.json"
    if not f.exists():
        return {}
    return {c["study_uid"]: c for c in json.loads(f.read_text()).get("cases", [])}


def build_dataset(export: str | Path, out: str | Path, seed: int = 0, size: int = MODEL_GRID) -> dict:
    """Scan `export`, pair, split and write the data set to `out`; return the manifest."""
    export, out = Path(export), Path(out)
    insts = [h for p in sorted(export.rglob("*")) if p.is_file() and p.name != "DICOMDIR"
             and p.suffix.lower() not in (".json", ".png", ".csv", ".npy") and (h := read_header(p)) is not None]
    paired, skipped = find_pairs(insts)
    splits = split_patients([p.patient_id for p in paired], seed)
    split_of = {pid: name for name, pids in splits.items() for pid in pids}
    info = _case_info(export)
    n = sum(len(p.mr) for p in paired)
    out.mkdir(parents=True, exist_ok=True)
    mr_arr = np.lib.format.open_memmap(out / "mr.npy", mode="w+", dtype=np.float16, shape=(n, 1, size, size))
    fu_arr = np.lib.format.open_memmap(out / "fusion.npy", mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    rows, i = [], 0
    for p in paired:
        m0 = p.mr[0]
        vol = normalize_series(np.stack([pydicom.dcmread(m.path).pixel_array for m in p.mr]))
        if m0.spacing is None:
            raise BrokenPair("mismatched geometry: the MR has no Pixel Spacing")
        place = GridPlacement.for_image(m0.rows, m0.cols, (m0.spacing[0], m0.spacing[1]), size=size)
        case = info.get(p.study_uid, {})
        for k, (m, f) in enumerate(zip(p.mr, p.fusion)):
            rgb = pydicom.dcmread(f.path).pixel_array
            mr_arr[i, 0] = place.to_grid(vol[k], fill=-1.0).astype(np.float16)
            fplace = GridPlacement.for_image(f.rows, f.cols, (m0.spacing[0] * m0.rows / f.rows,
                                                              m0.spacing[1] * m0.cols / f.cols), size=size)
            grid_rgb = fplace.to_grid(np.moveaxis(rgb, -1, 0).astype(np.float32), fill=0.0)
            fu_arr[i] = np.clip(np.rint(np.moveaxis(grid_rgb, 0, -1)), 0, 255).astype(np.uint8)
            rows.append({"index": i, "patient_id": p.patient_id, "study_uid": p.study_uid,
                         "mr_series_uid": m.series_uid, "fusion_series_uid": f.series_uid, "slice_index": k,
                         "position_mm": f"{p.positions[k]:.3f}",
                         "uptake": "" if case.get("suv_max") is None else case["suv_max"],
                         "lesion": "" if "lesion" not in case else int(bool(case["lesion"])),
                         "split": split_of[p.patient_id]})
            i += 1
    mr_arr.flush()
    fu_arr.flush()
    del mr_arr, fu_arr
    with open(out / "pairs.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["index", "patient_id", "study_uid", "mr_series_uid", "fusion_series_uid",
                                           "slice_index", "position_mm", "uptake", "lesion", "split"])
        w.writeheader()
        w.writerows(rows)
    counts = {"pairs": n, "patients": len(split_of)}
    counts.update({s: sum(1 for r in rows if r["split"] == s) for s in SPLITS})
    manifest = {"format": FORMAT, "grid": size, "seed": seed, "source": str(export), "counts": counts,
                "splits": splits, "skipped": skipped, "created": datetime.now(timezone.utc).isoformat()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    log.info("paired %d slices from %d studies; skipped %d series", n, len(paired), len(skipped))
    return manifest


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
    ap = argparse.ArgumentParser(prog="python -m training build-dataset", description=__doc__.split("\n")[0])
    ap.add_argument("--export", required=True, type=Path, help="export folder (phantom or hospital)")
    ap.add_argument("--out", required=True, type=Path, help="data set folder to write")
    ap.add_argument("--seed", type=int, default=0, help="seed of the patient-level split")
    a = ap.parse_args(argv)
    m = build_dataset(a.export, a.out, a.seed)
    c = m["counts"]
    print(f"{c['pairs']} pairs from {c['patients']} patients (train {c['train']}, val {c['val']}, "
          f"test {c['test']}); {len(m['skipped'])} skipped -> {a.out}")
    for s in m["skipped"]:
        print(f"  skipped study {s['study_uid']}: {s['reason']}")
    return 0
