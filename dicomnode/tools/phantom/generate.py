"""Plan and write phantom cases: patients with one or more PET/MR studies of the spine.

Everything derives from the seed: the same seed gives byte-identical files (UIDs included), and
the number of worker processes does not change the result.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Callable

import numpy as np

from dicomnode.tools.fusion import render_fusion
from dicomnode.tools.phantom.anatomy import Anatomy, Lesion, paint_case
from dicomnode.tools.phantom.enhanced import MR_FORMATS
from dicomnode.tools.phantom.grid import SliceGrid
from dicomnode.tools.phantom.uptake import mr_acquire, pet_acquire, suv_scale_bqml
from dicomnode.tools.phantom.writers import (
    VENDORS,
    series_description,
    stored_suv,
    uid,
    write_fusion,
    write_mr,
    write_pet,
)

log = logging.getLogger(__name__)

STUDIES_PER_PATIENT = 172 / 94  # Jung et al.: 94 patients, 172 examinations
_SURNAMES = ["Meier", "Schmidt", "Fischer", "Weber", "Wagner", "Becker", "Hoffmann", "Schulz", "Koch", "Richter",
             "Klein", "Wolf", "Neumann", "Schwarz", "Zimmermann", "Braun", "Hartmann", "Lange", "Krause", "Werner"]
_LATIN1_SURNAMES = ["Müller", "Schäfer", "Böhm", "Jäger", "Günther", "Köhler"]
_GIVEN = {"M": ["Hans", "Peter", "Klaus", "Juergen", "Michael", "Thomas", "Stefan", "Andreas", "Rolf", "Dieter"],
          "F": ["Anna", "Maria", "Ursula", "Monika", "Petra", "Sabine", "Renate", "Karin", "Elke", "Birgit"]}


@dataclass
class CaseSpec:
    """Everything needed to render and write one study (JSON-serialisable)."""

    case_id: str
    seed: int
    case_index: int
    patient_index: int
    patient_seed: int
    patient_id: str
    patient_name: str
    charset: str | None
    sex: str
    birth_date: str
    weight: float
    height: float
    study_date: str
    vendor: str
    weighting: str
    orientation: str
    rows: int
    cols: int
    slices: int
    fov_mm: float
    lesion: bool
    variant: int
    pet_grid: str = "scanner"  # "scanner": axial PET as the scanner writes it; "mr": resampled onto the MR slices
    mr_format: str = "classic"  # "legacy-enhanced", "enhanced": the MR series as one multi-frame instance
    content: str = ""  # an out-of-distribution kind (CONTENTS): what the pixels show under a T2FS header


def _matrix(rng: np.random.Generator, lo: int, hi: int) -> tuple[int, int]:
    standard = [m for m in (256, 320, 384, 448, 512) if lo <= m <= hi]
    sizes = standard or list(range(lo - lo % 16 + (16 if lo % 16 else 0), hi + 1, 16)) or [lo]
    rows = int(rng.choice(sizes))
    cols = rows
    if rng.random() < 0.25:  # rectangular field of view: fewer columns (AP) than rows (HF)
        c = int(round(rows * rng.choice([0.75, 0.8125, 0.875]) / 16) * 16)
        if c >= lo:
            cols = c
    return rows, cols


def plan_cases(n: int, seed: int, lesion_fraction: float = 0.5, min_matrix: int = 256, max_matrix: int = 512,
               min_slices: int = 12, max_slices: int = 20) -> list[CaseSpec]:
    """Assign n studies to patients (about 94 patients per 172 studies), vendors, matrices, and
    lesions: exactly round(n * lesion_fraction) studies carry a lesion."""
    if n < 1:
        raise ValueError("need at least one case")
    if not 0.0 <= lesion_fraction <= 1.0:
        raise ValueError("lesion fraction must lie in [0, 1]")
    if min_matrix > max_matrix or min_slices > max_slices:
        raise ValueError("min must not exceed max")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xCA5E]))
    n_patients = max(1, min(n, int(round(n / STUDIES_PER_PATIENT))))
    studies = np.ones(n_patients, int)
    for _ in range(n - n_patients):  # follow-up studies, at most 4 per patient while possible
        open_ = np.flatnonzero(studies < 4)
        studies[rng.choice(open_ if len(open_) else np.arange(n_patients))] += 1
    lesions = set(rng.permutation(n)[: int(round(n * lesion_fraction))].tolist())
    specs: list[CaseSpec] = []
    for p in range(n_patients):
        sex = str(rng.choice(["M", "F"]))
        latin1 = rng.random() < 0.15
        surname = str(rng.choice(_LATIN1_SURNAMES if latin1 else _SURNAMES))
        name = f"{surname}^{rng.choice(_GIVEN[sex])}"
        born = date(1935, 1, 1) + timedelta(days=int(rng.integers(0, 365 * 50)))
        vendor = str(rng.choice(sorted(VENDORS)))
        variant = int(rng.integers(0, 2))
        weight = float(rng.normal(78 if sex == "M" else 66, 12))
        height = float(rng.normal(1.76 if sex == "M" else 1.64, 0.07))
        patient_seed = int(rng.integers(2**31))
        first = date(2017, 1, 1) + timedelta(days=int(rng.integers(0, 365 * 6)))
        for st in range(int(studies[p])):
            i = len(specs)
            day = first + timedelta(days=int(st * rng.integers(21, 120)))
            rows, cols = _matrix(rng, min_matrix, max_matrix)
            specs.append(CaseSpec(
                case_id=f"case{i:04d}", seed=seed, case_index=i, patient_index=p, patient_seed=patient_seed,
                patient_id=f"PHS{seed}P{p:04d}", patient_name=name, charset="ISO_IR 100" if latin1 else None,
                sex=sex, birth_date=born.strftime("%Y%m%d"), weight=round(max(weight + rng.normal(0, 2), 40), 1),
                height=round(height, 2), study_date=day.strftime("%Y%m%d"), vendor=vendor, weighting="T2FS",
                orientation="sagittal", rows=rows, cols=cols,
                slices=int(rng.integers(min_slices, max_slices + 1)), fov_mm=float(rng.uniform(300, 380)),
                lesion=i in lesions, variant=variant))
    return specs


@dataclass
class Simulated:
    grid: SliceGrid
    mr: np.ndarray  # uint16 stored values
    suv: np.ndarray  # measured SUV on the MR grid (float32): what the fusion SC shows
    suv_true: np.ndarray
    lesion_mask: np.ndarray
    spine_mask: np.ndarray  # vertebral bodies and discs
    meta: dict
    pet_grid: SliceGrid | None = None  # the scanner's axial PET (None with spec.pet_grid "mr")
    pet_suv: np.ndarray | None = None  # measured SUV on pet_grid


PET_PLANES = ("scanner", "mr")


def scanner_pet_grid(mr: SliceGrid, vendor: str) -> SliceGrid:
    """The vendor's axial PET reconstruction (matrix, pixel, slice) centred on the MR field of view,
    with slices spanning the MR's whole head-foot extent."""
    pet = VENDORS[vendor]["pet"]
    corners = mr.positions()[[0, -1]]
    extent = [corners[:, 2].min(), corners[:, 2].max()]
    for r in (0, mr.rows - 1):
        z = corners[:, 2] + r * mr.row_spacing * mr.col_cosine[2]
        extent = [min(extent[0], z.min()), max(extent[1], z.max())]
    n = int(np.ceil((extent[1] - extent[0]) / pet["thickness"])) + 1
    centre = (mr.center[0], mr.center[1], float((extent[0] + extent[1]) / 2))
    return SliceGrid("axial", n, pet["matrix"], pet["matrix"], pet["pixel"], pet["pixel"], pet["thickness"],
                     pet["thickness"], centre)


@dataclass
class Scene:
    """Everything drawn for one study before the scanners acquire it: the patient, the lesion,
    the slice grid, and the generator state `paint_case` continues from."""

    anatomy: Anatomy
    lesion: Lesion | None
    modic: bool
    grid: SliceGrid
    rng: np.random.Generator


def scene(spec: CaseSpec) -> Scene:
    """Draw one study's patient, lesion and field of view (no rendering)."""
    anat = Anatomy.sample(np.random.default_rng(spec.patient_seed))
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, spec.case_index, 0x5EED]))
    lesion = Lesion.sample(rng) if spec.lesion else None
    modic = bool(rng.random() < 0.2)
    thick_lo, thick_hi = VENDORS[spec.vendor]["thickness"]
    thickness = float(rng.choice([thick_lo, thick_hi]))
    spacing = round(thickness * float(rng.choice([1.0, 1.1, 1.2])), 2)
    pix = spec.fov_mm / spec.rows
    level = str(rng.choice(["T11", "T12", "L1", "L2"]))
    if spec.orientation == "axial":
        zc = anat.disc_s(anat.lesion_disc) if lesion else anat.level_s("L3")
        centre = (float(anat.centre_x(zc)), float(anat.centre_y(zc)) - 40.0, zc)
        pix = 280.0 / max(spec.rows, spec.cols)
    else:
        zc = anat.level_s(level) + float(rng.uniform(-20, 20))
        if lesion is not None:  # keep the diseased disc inside the field of view
            half = spec.fov_mm / 2 - 35.0
            zl = anat.disc_s(anat.lesion_disc)
            zc = float(np.clip(zc, zl - half, zl + half))
        yc = float(anat.centre_y(zc))
        y = yc - float(rng.uniform(12, 35)) if spec.orientation == "sagittal" else yc - 15.0
        centre = (float(anat.centre_x(zc)) + float(rng.uniform(-3, 3)), y, zc)
    grid = SliceGrid(spec.orientation, spec.slices, spec.rows, spec.cols, round(pix, 6), round(pix, 6),
                     thickness, spacing, centre)
    return Scene(anat, lesion, modic, grid, rng)


# Out-of-distribution content under a sagittal T2FS header, for the input gate (issue: series the
# model was never trained for): another contrast, or a T2FS ruined by noise, motion ghosts, a
# strong coil inhomogeneity, or a field of view without the lumbar spine in its place.
CONTENTS = ("T1", "STIR", "T2", "noise", "ghosting", "inhomogeneity", "region")


def _ghosts(clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Periodic motion: faint copies of the object shifted along the phase-encoding direction."""
    shift = clean.shape[1] // int(rng.integers(3, 6))
    amp = np.float32(rng.uniform(0.25, 0.4))
    return clean + amp * (np.roll(clean, shift, axis=1) + np.roll(clean, -shift, axis=1))


def _bias(clean: np.ndarray, grid: SliceGrid, rng: np.random.Generator) -> np.ndarray:
    """A coil inhomogeneity several times the normal one: signal falling tenfold across the body."""
    _, Y, Z = grid.coords()
    _, cy, cz = grid.center
    steep = np.float32(rng.uniform(2.0, 2.8))
    return clean * np.exp(steep * (Y - cy) / 100 - np.float32(1.5) * ((Z - cz) / 120) ** 2).astype(np.float32)


def _rotated(mr: np.ndarray) -> np.ndarray:
    """Each slice turned a quarter (cropped or padded back to its matrix): no spine where it belongs."""
    out = np.zeros_like(mr)
    turned = np.rot90(mr, axes=(1, 2))
    r, c = min(mr.shape[1], turned.shape[1]), min(mr.shape[2], turned.shape[2])
    out[:, :r, :c] = turned[:, :r, :c]
    return out


def simulate(spec: CaseSpec) -> Simulated:
    """Render one study's MR and PET volumes (no files)."""
    sc = scene(spec)
    rng = sc.rng
    content = spec.content if spec.content in ("T1", "STIR", "T2") else spec.weighting
    painted = paint_case(sc.anatomy, sc.grid, content, sc.lesion, sc.modic, rng)
    fwhm, noise = float(rng.uniform(4.0, 6.0)), float(rng.uniform(0.10, 0.22))
    suv = pet_acquire(painted.suv, sc.grid, fwhm, noise, rng)
    gain, mr_noise = float(rng.uniform(800, 1700)), float(rng.uniform(0.015, 0.035))
    clean = painted.mr
    if spec.content in ("ghosting", "inhomogeneity", "noise"):
        orng = np.random.default_rng(np.random.SeedSequence([spec.seed, spec.case_index, 0x00D]))
        if spec.content == "ghosting":
            clean = _ghosts(clean, orng)
        elif spec.content == "inhomogeneity":
            clean = _bias(clean, sc.grid, orng)
        else:
            mr_noise *= float(orng.uniform(6.0, 10.0))
    mr = mr_acquire(clean, sc.grid, gain, mr_noise, rng)
    if spec.content == "region":
        mr = _rotated(mr)
    meta = dict(painted.meta, pet_fwhm_mm=round(fwhm, 2), pet_noise=noise, modic=sc.modic,
                uptake_true=round(sc.lesion.suv_peak, 3) if sc.lesion else None)
    sim = Simulated(sc.grid, mr, suv, painted.suv, painted.lesion_mask, painted.spine_mask, meta)
    if spec.pet_grid == "scanner":  # the same patient, lesion and scanner, on the PET's own grid
        sim.pet_grid = scanner_pet_grid(sc.grid, spec.vendor)
        prng = np.random.default_rng(np.random.SeedSequence([spec.seed, spec.case_index, 0x9E7]))
        on_pet = paint_case(sc.anatomy, sim.pet_grid, spec.weighting, sc.lesion, sc.modic, prng)
        sim.pet_suv = pet_acquire(on_pet.suv, sim.pet_grid, fwhm, noise, prng)
    return sim


def _case_header(spec: CaseSpec, grid: SliceGrid, pet_slices: int) -> dict:
    """UIDs, times and dose: the per-case values the writers need."""
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, spec.case_index, 0x4EAD]))
    key = (spec.seed, spec.case_index)
    hh, mm = int(rng.integers(7, 16)), int(rng.integers(0, 60))
    study_time = f"{hh:02d}{mm:02d}{int(rng.integers(0, 60)):02d}"
    series_time = f"{hh:02d}{min(mm + 20, 59):02d}10"
    uptake_s = int(rng.integers(55 * 60, 75 * 60))
    inj = hh * 3600 + min(mm + 20, 59) * 60 + 10 - uptake_s
    dose = float(spec.weight * rng.uniform(2.5, 3.5) * 1e6)
    birth = date(int(spec.birth_date[:4]), int(spec.birth_date[4:6]), int(spec.birth_date[6:]))
    study = date(int(spec.study_date[:4]), int(spec.study_date[4:6]), int(spec.study_date[6:]))
    age = study.year - birth.year - ((study.month, study.day) < (birth.month, birth.day))
    n = spec.slices
    desc = series_description(spec.vendor, spec.weighting, spec.orientation, spec.variant)
    planes = {"sagittal": ("sag", "Sag"), "axial": ("tra", "Ax"), "coronal": ("cor", "Cor")}
    plane = planes["axial" if spec.pet_grid == "scanner" else spec.orientation]
    v = VENDORS[spec.vendor]
    mr_no = int(rng.integers(3, 9))
    return dict(
        vendor=spec.vendor, weighting=spec.weighting, charset=spec.charset, patient_name=spec.patient_name,
        patient_id=spec.patient_id, birth_date=spec.birth_date, sex=spec.sex, age=f"{age:03d}Y",
        weight=spec.weight, height=spec.height, study_date=spec.study_date, study_time=study_time,
        series_time=series_time, accession=f"A{spec.seed % 1000:03d}{spec.case_index:06d}",
        study_id=str(1 + spec.case_index % 9999), referring="Ortho^Clinic",
        study_uid=uid(*key, "study"), frame_uid=uid(*key, "frame"),
        mr_series_uid=uid(*key, "mr"), pet_series_uid=uid(*key, "pet"), fusion_series_uid=uid(*key, "fusion"),
        mr_sop_uids=[uid(*key, "mr", k) for k in range(n)], pet_sop_uids=[uid(*key, "pet", k) for k in range(pet_slices)],
        fusion_sop_uids=[uid(*key, "fusion", k) for k in range(n)],
        mr_series_number=mr_no, pet_series_number=100 + mr_no, fusion_series_number=9000 + mr_no,
        series_description=desc, pet_description=v["pet_desc"].format(p=plane[0], P=plane[1]),
        fusion_description=v["fusion_desc"].format(d=desc, P=plane[1]),
        injection_time=f"{int(inj // 3600):02d}{int(inj % 3600 // 60):02d}{int(inj % 60):02d}",
        dose_bq=dose, bqml_per_suv=suv_scale_bqml(spec.weight, dose, uptake_s), pet_on_mr_grid=spec.pet_grid == "mr")


def uptake_group(suv_max: float | None) -> str | None:
    """Uptake strata for evaluation: low < 4 <= moderate < 8 <= high (lesion SUVmax)."""
    if suv_max is None:
        return None
    return "low" if suv_max < 4 else ("moderate" if suv_max < 8 else "high")


def write_spec(spec: CaseSpec, out_dir: Path, with_thumb: bool = False) -> dict:
    """Simulate and write one case under out_dir/<case_id>/{MR,PET,FUSION}; return its record."""
    sim = simulate(spec)
    pet_grid, pet_suv = (sim.pet_grid, sim.pet_suv) if sim.pet_grid is not None else (sim.grid, sim.suv)
    head = _case_header(spec, sim.grid, pet_grid.slices)
    case_dir = Path(out_dir) / spec.case_id
    lo, hi = (float(v) for v in np.percentile(sim.mr, [0.5, 99.5]))
    window = (float(round((lo + hi) / 2)), float(max(round(hi - lo), 1)))  # as written to the header
    mr_paths = write_mr(head, sim.grid, sim.mr, case_dir / "MR", window)
    if spec.mr_format != "classic":
        from dicomnode.tools.phantom.enhanced import write_multiframe

        mr_paths = write_multiframe(mr_paths, spec.mr_format)
    pet_paths = write_pet(head, pet_grid, pet_suv, case_dir / "PET", on_mr_grid=sim.pet_grid is None)
    # The workstation's fusion: the PET as simulated at the MR's resolution, stored as the scanner would.
    fused_suv = stored_suv(sim.suv, head["bqml_per_suv"])
    rgb = np.stack([render_fusion(sim.mr[k], fused_suv[k], t2_window=window) for k in range(spec.slices)])
    fusion_paths = write_fusion(head, sim.grid, rgb, case_dir / "FUSION")
    suv_max = float(fused_suv[sim.lesion_mask].max()) if spec.lesion and sim.lesion_mask.any() else None
    record = {
        "case_id": spec.case_id, "patient_id": spec.patient_id, "study_uid": head["study_uid"],
        "study_date": spec.study_date, "lesion": spec.lesion, "lesion_level": sim.meta.get("lesion_level"),
        "suv_max": round(suv_max, 3) if suv_max is not None else None, "uptake_group": uptake_group(suv_max),
        "uptake_true": sim.meta["uptake_true"], "modic": sim.meta["modic"], "vendor": spec.vendor,
        "series_description": head["series_description"], "weighting": spec.weighting,
        "orientation": spec.orientation, "rows": spec.rows, "cols": spec.cols, "slices": spec.slices,
        "pixel_spacing_mm": sim.grid.row_spacing, "slice_spacing_mm": sim.grid.slice_spacing,
        "pet_fwhm_mm": sim.meta["pet_fwhm_mm"], "pet_grid": spec.pet_grid, "mr_format": spec.mr_format,
        "content": spec.content or None,
        "pet_pixel_spacing_mm": pet_grid.row_spacing, "pet_slice_spacing_mm": pet_grid.slice_spacing,
        "mr_series_uid": head["mr_series_uid"],
        "pet_series_uid": head["pet_series_uid"], "fusion_series_uid": head["fusion_series_uid"],
        "mr": [str(p) for p in mr_paths], "pet": [str(p) for p in pet_paths],
        "fusion": [str(p) for p in fusion_paths],
    }
    if with_thumb:
        k = spec.slices // 2
        grey = np.repeat((np.clip((sim.mr[k] - (window[0] - window[1] / 2)) / window[1], 0, 1) * 255)
                         .astype(np.uint8)[..., None], 3, axis=-1)
        record["_thumb"] = np.concatenate([grey, rgb[k]], axis=1)
    return record


def _write_spec_star(args) -> dict:
    return write_spec(*args)


def generate(out_dir: str | Path, cases: int, seed: int, *, lesion_fraction: float = 0.5, min_matrix: int = 256,
             max_matrix: int = 512, min_slices: int = 12, max_slices: int = 20, preview: bool = False,
             jobs: int = 1, on_case: Callable[[dict], None] | None = None, pet_grid: str = "scanner",
             mr_format: str = "classic", content: str = "") -> list[dict]:
    """Write `cases` studies and OUT_DIR/cases.json (plus OUT_DIR/preview.png with preview);
    `on_case(record)` is called as each study is written (for a progress bar)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if pet_grid not in PET_PLANES:
        raise ValueError(f"pet_grid must be one of {PET_PLANES}")
    specs = plan_cases(cases, seed, lesion_fraction, min_matrix, max_matrix, min_slices, max_slices)
    if mr_format not in MR_FORMATS:
        raise ValueError(f"mr_format must be one of {MR_FORMATS}")
    if content and content not in CONTENTS:
        raise ValueError(f"content must be one of {CONTENTS}")
    for s in specs:
        s.pet_grid, s.mr_format, s.content = pet_grid, mr_format, content
    thumbs = set(range(min(len(specs), 8))) if preview else set()
    args = [(s, out, s.case_index in thumbs) for s in specs]
    records = []
    with ProcessPoolExecutor(jobs) if jobs > 1 else nullcontext() as pool:
        for record in (pool.map(_write_spec_star, args, chunksize=1) if pool else map(_write_spec_star, args)):
            records.append(record)
            if on_case is not None:
                on_case(record)
    pics = [r.pop("_thumb") for r in records if "_thumb" in r]
    for r in records:
        for key in ("mr", "pet", "fusion"):
            r[key] = [str(Path(p).relative_to(out)) for p in r[key]]
    plan = dict(min_matrix=min_matrix, max_matrix=max_matrix, min_slices=min_slices, max_slices=max_slices)
    (out / "cases.json").write_text(json.dumps({"seed": seed, "lesion_fraction": lesion_fraction, "plan": plan,
                                                "pet_grid": pet_grid, "cases": records}, indent=1))
    if preview and pics:
        contact_sheet(pics, out / "preview.png")
    log.info("wrote %d phantom cases (%d patients)", len(records), len({r["patient_id"] for r in records}))
    return records


def contact_sheet(pics: list[np.ndarray], path: Path, tile: int = 256, per_row: int = 2) -> None:
    """Tile (MR | fusion) mid-slice pairs into one PNG."""
    from PIL import Image

    tiles = []
    for p in pics:
        im = Image.fromarray(p)
        scale = tile / max(im.height, im.width / 2)
        tiles.append(np.asarray(im.resize((int(im.width * scale), int(im.height * scale)), Image.Resampling.BILINEAR)))
    h = max(t.shape[0] for t in tiles)
    w = max(t.shape[1] for t in tiles)
    rows = (len(tiles) + per_row - 1) // per_row
    sheet = np.zeros((rows * (h + 4), per_row * (w + 4), 3), np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, per_row)
        sheet[r * (h + 4):r * (h + 4) + t.shape[0], c * (w + 4):c * (w + 4) + t.shape[1]] = t
    Image.fromarray(sheet).save(path)


def write_case(out_dir: str | Path, seed: int, *, vendor: str | None = None, rows: int | None = None,
               cols: int | None = None, slices: int | None = None, lesion: bool | None = None,
               patient_name: str | None = None, specific_character_set: str | None = None,
               orientation: str = "sagittal", weighting: str = "T2FS", pet_grid: str = "scanner",
               mr_format: str = "classic", content: str = "") -> dict:
    """One study with chosen properties, for tests of the node and engine.

    Writes out_dir/<case_id>/{MR,PET,FUSION}/NNN.dcm and returns the case record (absolute paths
    in "mr", "pet", "fusion"). A non-ASCII name without a character set gets ISO_IR 192.
    """
    spec = plan_cases(1, seed, lesion_fraction=0.5)[0]
    if vendor is not None:
        if vendor.lower() not in VENDORS:
            raise ValueError(f"vendor must be one of {sorted(VENDORS)}")
        spec.vendor = vendor.lower()
    if orientation not in ("sagittal", "axial", "coronal"):
        raise ValueError("orientation must be sagittal, axial or coronal")
    if weighting not in ("T2FS", "T1", "STIR"):
        raise ValueError("weighting must be T2FS, T1 or STIR")
    spec.rows = rows or spec.rows
    spec.cols = cols or (rows if rows and not cols else spec.cols)
    spec.slices = slices or spec.slices
    if lesion is not None:
        spec.lesion = bool(lesion)
    if patient_name is not None:
        spec.patient_name = patient_name
        spec.charset = specific_character_set or (None if patient_name.isascii() else "ISO_IR 192")
    elif specific_character_set is not None:
        spec.charset = specific_character_set
    if pet_grid not in PET_PLANES:
        raise ValueError(f"pet_grid must be one of {PET_PLANES}")
    if mr_format not in MR_FORMATS:
        raise ValueError(f"mr_format must be one of {MR_FORMATS}")
    if content and content not in CONTENTS:
        raise ValueError(f"content must be one of {CONTENTS}")
    spec.orientation, spec.weighting, spec.pet_grid, spec.mr_format = orientation, weighting, pet_grid, mr_format
    spec.content = content
    record = write_spec(spec, Path(out_dir).resolve())
    record["spec"] = asdict(spec)
    return record
