"""Benchmark: the best PSNR/SSIM any model can reach on the phantom, and what doing nothing gets.

The written fusion contains PET noise that no image-to-image model can predict from the MR. This
re-simulates the phantom studies (same seed, so the same cases as `dicomnode phantom`) and scores,
on the model grid with the evaluation's metrics (dicomnode.tools.imagemetrics):

- ceiling: fusion rendered from the noise-free PET (true uptake after the scanner blur) against
  the written fusion. It also knows every uptake value (heart, lesion, marrow), which a model has
  to guess from the MR, so real models stay well below it;
- floor: fusion rendered with no PET at all (the grey T2FS through the same blend);
- bound (with --draws J): the minimum-MSE prediction from the MR. The phantom draws some uptake
  values independently of everything the MR shows (`Anatomy.HIDDEN_UPTAKE`, `Lesion.HIDDEN_UPTAKE`:
  marrow, muscle, bowel and myocardial SUV; the lesion's peak SUV, extent, offset and abscess rim).
  Given the exact anatomy, the minimum-MSE fusion is the mean fusion over those values and the PET
  noise, estimated from J re-paintings with fresh hidden values and noise (its MSE corrected for
  the finite J: minus the per-pixel sample variance / J). It knows the anatomy, PET resolution and
  noise level exactly, which a model must infer, so in expectation no model's MSE is lower:
  `bound_psnr_of_mean_mse` bounds -10 log10(mean MSE). The mean of per-slice PSNR (the paper's
  metric) is not bounded exactly: on a log scale, guessing the most common uptake can beat the
  average guess on some slices. Its SSIM bounds nothing.
- typical (with --draws): a plain guess for comparison, the noise-free PET of the exact anatomy
  with every hidden value at its prior median;
- model (with --model DIR): the model's own output for the re-simulated MR, prepared as the data
  set is, with the card's sampler; pix2pix: its Pix2Pix output alone. With K > 1 samples, the
  K-sample SD map is checked against where the MR hides the uptake (lesion and myocardium):
  `model_sd_error_corr` (per slice, SD against absolute error), `model_sd_hidden` and
  `model_sd_elsewhere` (mean SD inside and outside those pixels).

Where the squared error comes from: `*_hidden_mse` is the part of each prediction's MSE made in
the pixels whose uptake the MR hides (lesion and myocardium; for the bound, from the J-draw mean
without the finite-J correction), and `*_myocardium_bias` the mean signed error in the
myocardium (positive: a hotter heart than the real one). The phantom's myocardial SUV is drawn
from three modes (about 1.5, 3 and 8), so a model that draws the heart hot or cold with
confidence loses much of its PSNR there, however well it does the rest. Each study's entry in
`per_case` gives its `myocardium_suv`.

For studies with a lesion, each prediction is also scored inside the lesion mask (on the grid):
`*_lesion_psnr`, and `*_lesion_bias`, the mean signed error there (negative: less uptake shown
than in the real fusion). This asks the clinical question the whole-image PSNR hides: does the
synthetic image show uptake where the infection is?

A model observer answers the clinical question per study, as a reader would ("uptake at a disc or
vertebra: yes / no"), on the real fusion and on every prediction. It reads the PET colour of each
pixel (the fusion minus the grey of the no-PET fusion, over the opacity) inside the phantom's
vertebral bodies and discs (`Simulated.spine_mask`, on the grid, eroded by 2 pixels) and scores the
study by one of OBSERVER_DESIGNS. On a validation run (no --observer) the design is chosen by the
real fusions' ROC AUC for lesion presence, and each source's threshold by Youden's J on its own
scores; `--save-observer` saves both. A cohort run given that file (`--observer`) applies them
unchanged and reports, per source, `*_lesion_auc`, and sensitivity and specificity at the real
fusions' threshold (`*_lesion_sensitivity`, `*_lesion_specificity`: a reader's eye trained on
real PET reading synthetic images) and at the source's own (`*_own`).

    python bench/bench_ceiling.py --cases 400 --seed 12 --split-seed 0 --split val \
        --draws 16 --model models/t2fs2petfusion --save-observer observer.json
    python bench/bench_ceiling.py --cases 40 --seed 2027 --draws 16 --model models/t2fs2petfusion \
        --observer observer.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from dicomnode.infer.grid import GridPlacement, normalize_series
from dicomnode.infer.model import load_model, read_card, write_card
from dicomnode.tools import imagemetrics
from dicomnode.tools.fusion import OPACITY, render_fusion
from dicomnode.tools.phantom.anatomy import Anatomy, Lesion, paint_case
from dicomnode.tools.phantom.generate import plan_cases, scene, simulate
from dicomnode.tools.phantom.uptake import pet_acquire

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the training code (its patient-level split)
from training.data import split_patients  # noqa: E402


def _grid_unit(place: GridPlacement, rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(place.to_grid(np.moveaxis(rgb, -1, 0).astype(np.float32), fill=0.0) / 255.0)


def _redraw_hidden(obj, rng: np.random.Generator):
    """`obj` (an Anatomy or a Lesion) with its MR-invisible uptake values drawn afresh."""
    fresh = type(obj).sample(rng)
    return dataclasses.replace(obj, **{f: getattr(fresh, f) for f in type(obj).HIDDEN_UPTAKE})


def _typical_hidden(cls, n: int = 1001) -> dict:
    """The prior median of each MR-invisible uptake value of `cls` (Anatomy or Lesion)."""
    draws = [cls.sample(np.random.default_rng([0x7E, i])) for i in range(n)]
    med = {f: np.median(np.asarray([getattr(d, f) for d in draws], dtype=float), axis=0) for f in cls.HIDDEN_UPTAKE}
    return {f: tuple(float(x) for x in v) if v.ndim else float(v) for f, v in med.items()}


def typical_suv(spec, sim) -> np.ndarray:
    """Noise-free PET of the exact anatomy with every hidden uptake value at its prior median."""
    sc = scene(spec)
    anat = dataclasses.replace(sc.anatomy, **_typical_hidden(Anatomy))
    lesion = dataclasses.replace(sc.lesion, **_typical_hidden(Lesion)) if sc.lesion is not None else None
    painted = paint_case(anat, sc.grid, spec.weighting, lesion, sc.modic, copy.deepcopy(sc.rng))
    return _blur(painted.suv, sc.grid, sim.meta["pet_fwhm_mm"])


def _blur(suv: np.ndarray, g, fwhm_mm: float) -> np.ndarray:
    sigma = fwhm_mm / 2.3548
    return ndimage.gaussian_filter(suv, (sigma / g.slice_spacing, sigma / g.row_spacing, sigma / g.col_spacing),
                                   mode="nearest")


def mmse_fusion(spec, sim, place: GridPlacement, window, draws: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte-Carlo mean fusion over the hidden uptake values and the PET noise, on the model grid,
    and the per-slice variance of that mean (mean over pixels of sample variance / draws)."""
    sc = scene(spec)
    total = total_sq = None
    for j in range(draws):
        r = np.random.default_rng([spec.seed, spec.case_index, 0xB0D, j])
        anat = _redraw_hidden(sc.anatomy, r)
        lesion = _redraw_hidden(sc.lesion, r) if sc.lesion is not None else None
        painted = paint_case(anat, sc.grid, spec.weighting, lesion, sc.modic, copy.deepcopy(sc.rng))
        if j == 0 and not np.array_equal(painted.mr, paint_case(sc.anatomy, sc.grid, spec.weighting, sc.lesion,
                                                                 sc.modic, copy.deepcopy(sc.rng)).mr):
            raise RuntimeError("re-painting changed the MR: a hidden value is not hidden")
        suv = pet_acquire(painted.suv, sc.grid, sim.meta["pet_fwhm_mm"], sim.meta["pet_noise"], r)
        f = torch.stack([_grid_unit(place, render_fusion(sim.mr[k], suv[k], t2_window=window))
                         for k in range(spec.slices)]).double()
        total = f if total is None else total + f
        total_sq = f * f if total_sq is None else total_sq + f * f
    mean = total / draws
    var = (total_sq / draws - mean * mean) * draws / max(draws - 1, 1)
    return mean.float(), var.clamp_min(0).mean(dim=(1, 2, 3)) / draws


def model_fusion(model, sim, place: GridPlacement, seed: int, batch_size: int = 4):
    """The model's fusion of the simulated MR on the grid, in [0, 1], prepared as the data set is;
    also its Pix2Pix output alone and the per-pixel SD over the card's K samples (None if K = 1)."""
    mr = normalize_series(sim.mr)
    batch = torch.from_numpy(np.stack([place.to_grid(s) for s in mr])[:, None])
    out = [model.translate(batch[i:i + batch_size], seed=seed + i) for i in range(0, len(batch), batch_size)]
    unit = lambda t: ((t.float() + 1) / 2).clamp(0, 1)  # noqa: E731
    sd = None if out[0].sd is None else torch.cat([o.sd.float() / 2 for o in out])  # SD in [0, 1] units
    return unit(torch.cat([o.rgb for o in out])), unit(torch.cat([o.pix2pix for o in out])), sd


def hidden_uptake_mask(spec, sim, place: GridPlacement) -> torch.Tensor:
    """Where the MR hides the uptake, on the grid: the lesion mask and the myocardium (the pixels
    whose SUV moves when only the myocardial SUV is changed)."""
    sc = scene(spec)
    hot = paint_case(dataclasses.replace(sc.anatomy, heart_suv=sc.anatomy.heart_suv + 5.0), sc.grid, spec.weighting,
                     sc.lesion, sc.modic, copy.deepcopy(sc.rng))
    m = (np.abs(hot.suv - sim.suv_true) > 0.5) | sim.lesion_mask
    return torch.from_numpy(np.stack([place.to_grid(k.astype(np.float32), fill=0.0) > 0.5 for k in m]))


def sd_scores(real: torch.Tensor, pred: torch.Tensor, sd: torch.Tensor, hidden: torch.Tensor) -> dict[str, list[float]]:
    """Per slice: Pearson correlation of the K-sample SD with the absolute error (channel means),
    and the mean SD inside the hidden-uptake mask and outside it (slices with >= 16 such pixels)."""
    err, s = (pred - real).abs().mean(1).flatten(1).double(), sd.mean(1).flatten(1).double()
    ec, sc_ = err - err.mean(1, keepdim=True), s - s.mean(1, keepdim=True)
    corr = (ec * sc_).sum(1) / (ec.norm(dim=1) * sc_.norm(dim=1)).clamp_min(1e-12)
    out = {"model_sd_error_corr": corr.tolist(), "model_sd_hidden": [], "model_sd_elsewhere": []}
    for k, m in zip(s, hidden.flatten(1)):
        if int(m.sum()) >= 16:
            out["model_sd_hidden"].append(float(k[m].mean()))
            out["model_sd_elsewhere"].append(float(k[~m].mean()))
    return out


def region_scores(real: torch.Tensor, pred: torch.Tensor, hidden: torch.Tensor,
                  lesion: torch.Tensor | None) -> tuple[list[float], list[float]]:
    """Where the squared error comes from. Per slice: the part of the MSE contributed by the
    hidden-uptake pixels (their summed squared error over all pixels, so `mse - hidden_mse` is the
    rest of the image); and per slice with >= 16 myocardium pixels (hidden, not lesion), the mean
    signed error there (positive: a hotter heart than the real one)."""
    se, d = ((pred - real) ** 2).mean(1).double(), (pred - real).mean(1).double()
    myo = hidden if lesion is None else hidden & ~lesion
    hidden_mse = [float(e[m].sum() / e.numel()) for e, m in zip(se, hidden)]
    myo_bias = [float(e[m].mean()) for e, m in zip(d, myo) if int(m.sum()) >= 16]
    return hidden_mse, myo_bias


def lesion_scores(real: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per lesion slice (>= 16 lesion pixels on the grid): PSNR inside the lesion and the mean
    signed error there (negative: the prediction shows less uptake than the real fusion)."""
    psnr, bias = [], []
    for r, p, m in zip(real, pred, mask):
        if int(m.sum()) >= 16:
            d = (p - r)[:, m]
            psnr.append(float(-10 * torch.log10((d.double() ** 2).mean().clamp_min(1e-10))))
            bias.append(float(d.mean()))
    return psnr, bias


OBSERVER_DESIGNS = {
    "p99": "the 99th percentile of the PET colour over all spine pixels of the study",
    "contrast": "that 99th percentile minus the (lower) median: uptake above the study's own marrow",
    "peak": "the highest per-slice 99th percentile (slices with >= 64 spine pixels)",
}


def spine_grid(sim, place: GridPlacement, erode: int = 2) -> torch.Tensor:
    """The phantom's vertebral bodies and discs on the grid (S, G, G), eroded by `erode` pixels so
    that the observer does not read the PET spilling in from the tissue around them."""
    m = np.stack([place.to_grid(k.astype(np.float32), fill=0.0) > 0.5 for k in sim.spine_mask])
    if erode:
        m = ndimage.binary_erosion(m, structure=np.ones((1, 3, 3), bool), iterations=erode)
    return torch.from_numpy(m)


def pet_colour(fusion: torch.Tensor, grey: torch.Tensor) -> torch.Tensor:
    """Per pixel (S, G, G) in [0, 1]: the PET colour of fusions (S, 3, G, G) in [0, 1], given the
    same fusions without PET (`grey`: (1 - opacity) x the windowed T2)."""
    return ((fusion.float() - grey.float()) / OPACITY).clamp(0, 1).mean(1)


def observer_scores(pet: torch.Tensor, spine: torch.Tensor) -> dict[str, float]:
    """One study's scores under each of OBSERVER_DESIGNS (0 when no spine is in view)."""
    inside = pet[spine].double()
    if inside.numel() == 0:
        return dict.fromkeys(OBSERVER_DESIGNS, 0.0)
    p99 = float(torch.quantile(inside, 0.99))
    slices = [torch.quantile(p[m].double(), 0.99) for p, m in zip(pet, spine) if int(m.sum()) >= 64]
    return {"p99": p99, "contrast": p99 - float(inside.median()),
            "peak": float(max(slices)) if slices else p99}


def roc_auc(scores: list[float], labels: list[bool]) -> float | None:
    """ROC AUC (Mann-Whitney, ties count half); None without both classes."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def youden_threshold(scores: list[float], labels: list[bool]) -> float:
    """The threshold t (positive: score >= t) with the highest sensitivity + specificity, among the
    midpoints between consecutive distinct scores; on a tie the lowest (the more sensitive)."""
    v = sorted(set(scores))
    cuts = [v[0] - 1.0] + [(a + b) / 2 for a, b in zip(v, v[1:])] + [v[-1] + 1.0]
    return max(cuts, key=lambda t: (sum(sens_spec(scores, labels, t)), -t))


def sens_spec(scores: list[float], labels: list[bool], t: float) -> tuple[float, float]:
    pos = [s >= t for s, y in zip(scores, labels) if y]
    neg = [s < t for s, y in zip(scores, labels) if not y]
    return (sum(pos) / len(pos) if pos else float("nan"), sum(neg) / len(neg) if neg else float("nan"))


def lesion_observer(per_case: list[dict], fixed: dict | None = None, chosen_on: str = "") -> tuple[dict, dict]:
    """The observer's figures per source: ({name}_lesion_auc, _sensitivity, _specificity and the
    _own ones) and its settings. Without `fixed` (a validation run) the design is chosen by the real
    fusions' AUC and each source's threshold by Youden's J; with `fixed` (a validation run's
    `lesion_observer`) both are applied unchanged."""
    labels = [bool(c["lesion"]) for c in per_case]
    sources = [k[:-len("_spine_p99")] for k in per_case[0] if k.endswith("_spine_p99") and k != "floor_spine_p99"]
    if fixed is None:
        auc = {d: roc_auc([c[f"real_spine_{d}"] for c in per_case], labels) for d in OBSERVER_DESIGNS}
        design = max(OBSERVER_DESIGNS, key=lambda d: auc[d] or 0.0)
        own = {n: youden_threshold([c[f"{n}_spine_{design}"] for c in per_case], labels) for n in sources}
        settings = {"design": design, "reads": OBSERVER_DESIGNS[design], "real_auc_by_design": auc,
                    "threshold": own["real"], "own_thresholds": own,
                    "chosen_on": f"{len(per_case)} studies ({sum(labels)} with a lesion) {chosen_on}".strip()}
    else:
        design, own = fixed["design"], fixed["own_thresholds"]
        settings = {k: fixed[k] for k in ("design", "threshold", "own_thresholds", "chosen_on")}
        settings["reads"] = OBSERVER_DESIGNS[design]
    figures = {}
    for n in sources:
        scores = [c[f"{n}_spine_{design}"] for c in per_case]
        figures[f"{n}_lesion_auc"] = roc_auc(scores, labels)
        for suffix, t in (("", settings["threshold"]), ("_own", own.get(n))):
            if t is not None:
                se, sp = sens_spec(scores, labels, t)
                figures[f"{n}_lesion_sensitivity{suffix}"], figures[f"{n}_lesion_specificity{suffix}"] = se, sp
    return {k: None if v is None else round(v, 3) for k, v in figures.items()}, settings


def score_case(spec, draws: int = 0, model=None) -> dict[str, list[float]]:
    """Per-slice PSNR/SSIM/MSE of the ceiling, the floor, and (draws > 0) the typical guess and
    the MR-only bound, and (with a model) of the model; the same inside the lesion, if any. The
    observer's per-study scores of the real fusion and of each prediction are one-value lists
    `{name}_spine_{design}`."""
    spec.pet_grid = "mr"  # everything here is on the MR grid: the scanner's axial PET is not needed
    sim = simulate(spec)
    g = sim.grid
    clean = _blur(sim.suv_true, g, sim.meta["pet_fwhm_mm"])
    lo, hi = (float(v) for v in np.percentile(sim.mr, [0.5, 99.5]))
    window = (float(round((lo + hi) / 2)), float(max(round(hi - lo), 1)))
    place = GridPlacement.for_image(spec.rows, spec.cols, (g.row_spacing, g.col_spacing))
    pets = {"ceiling": clean, "floor": np.zeros_like(clean)}
    if draws > 0:
        pets["typical"] = typical_suv(spec, sim)

    def fusion(suv):
        return torch.stack([_grid_unit(place, render_fusion(sim.mr[k], suv[k], t2_window=window))
                            for k in range(spec.slices)])

    real_t = fusion(sim.suv)
    preds = {name: fusion(suv) for name, suv in pets.items()}
    if model is not None:
        preds["model"], preds["pix2pix"], sd = model_fusion(model, sim, place, seed=1000 * spec.case_index)
    out = {}
    hidden = hidden_uptake_mask(spec, sim, place)
    if model is not None and sd is not None:
        out.update(sd_scores(real_t, preds["model"], sd, hidden))
    for name, pred in preds.items():
        m = imagemetrics.all_metrics(real_t, pred)
        for key in ("psnr", "ssim", "mse"):
            out[f"{name}_{key}"] = np.ravel(m[key]).tolist()
    if draws > 0:
        mean, var_of_mean = mmse_fusion(spec, sim, place, window, draws)
        mse = (((mean.double() - real_t.double()) ** 2).mean(dim=(1, 2, 3)) - var_of_mean).clamp_min(1e-10)
        out["bound_psnr"] = (-10 * torch.log10(mse)).tolist()
        out["bound_ssim"] = np.ravel(imagemetrics.all_metrics(real_t, mean)["ssim"]).tolist()
        out["bound_mse"] = mse.tolist()
        preds["bound"] = mean
    mask = torch.from_numpy(np.stack([place.to_grid(k.astype(np.float32), fill=0.0) > 0.5
                                      for k in sim.lesion_mask])) if spec.lesion else None
    for name, pred in preds.items():
        out[f"{name}_hidden_mse"], out[f"{name}_myocardium_bias"] = region_scores(real_t, pred, hidden, mask)
        if mask is not None:
            out[f"{name}_lesion_psnr"], out[f"{name}_lesion_bias"] = lesion_scores(real_t, pred, mask)
    spine = spine_grid(sim, place)
    for name, fused in {"real": real_t, **preds}.items():
        if name == "floor":  # no PET colour by construction
            continue
        for design, v in observer_scores(pet_colour(fused, preds["floor"]), spine).items():
            out[f"{name}_spine_{design}"] = [v]
    return out


def uptake_shown(per_case: list[dict], name: str) -> float | None:
    """1 - (mean signed error inside the lesions / that of no PET), pooled over the lesion studies
    (each study's slice-mean weighted by its number of slices)."""
    les = [c for c in per_case if c["lesion"] and f"{name}_lesion_bias" in c and "floor_lesion_bias" in c]
    if not les:
        return None
    w = np.asarray([c["slices"] for c in les], float)
    bias = np.asarray([c[f"{name}_lesion_bias"] for c in les]) @ w
    return round(float(1 - bias / (np.asarray([c["floor_lesion_bias"] for c in les]) @ w)), 3)


def cohort_summary(result: dict, command: str) -> dict:
    """The card's `cohort` block: each prediction's mean PSNR/SSIM/MSE and lesion uptake shown; with
    the bound, the lesion studies whose model error is below min(0, the bound's) - 0.03."""
    names = [n for n in ("ceiling", "bound", "typical", "model", "pix2pix", "floor") if f"{n}_psnr" in result]
    out = {"command": command, "studies": result["cases"], "slices": result["slices"],
           "lesion_studies": sum(c["lesion"] for c in result["per_case"]), "metric_note": result["metric_note"]}
    for n in names:
        out[n] = {k: result[f"{n}_{k}"]["mean"] for k in ("psnr", "ssim", "mse")}
        for k in ("hidden_mse", "myocardium_bias"):
            if f"{n}_{k}" in result:
                out[n][k] = result[f"{n}_{k}"]["mean"]
        out[n]["uptake_shown"] = uptake_shown(result["per_case"], n)
        for k in ("auc", "sensitivity", "specificity"):
            if f"{n}_lesion_{k}" in result:
                out[n][f"lesion_{k}"] = result[f"{n}_lesion_{k}"]
    if "lesion_observer" in result:
        obs = result["lesion_observer"]
        out["lesion_observer"] = {"reads": obs["reads"], "threshold": round(obs["threshold"], 4),
                                  "chosen_on": obs["chosen_on"],
                                  "real": {k: result[f"real_lesion_{k}"] for k in ("auc", "sensitivity", "specificity")}}
    if "bound" in names and "model" in names:
        out["lesion_studies_under_showing"] = [
            c["case"] for c in result["per_case"]
            if c["lesion"] and c["model_lesion_bias"] < min(0.0, c["bound_lesion_bias"]) - 0.03]
    if "model_sd_error_corr" in result:
        out["sd_map"] = {"corr_with_abs_error": result["model_sd_error_corr"]["mean"],
                         "mean_sd_hidden_uptake": result["model_sd_hidden"]["mean"],
                         "mean_sd_elsewhere": result["model_sd_elsewhere"]["mean"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=100, help="as given to `dicomnode phantom --cases`")
    ap.add_argument("--seed", type=int, default=11, help="as given to `dicomnode phantom --seed`")
    ap.add_argument("--split-seed", type=int, help="score only --split of the patient-level split that "
                    "`python -m training data --seed N` draws on these studies")
    ap.add_argument("--split", default="test", choices=("train", "val", "test"))
    ap.add_argument("--lesion-only", action="store_true", help="score only the studies with a lesion")
    ap.add_argument("--limit", type=int, help="score only the first N studies (after --split and --lesion-only)")
    ap.add_argument("--draws", type=int, default=0, help="re-paintings per study for the MR-only bound (0: skip it)")
    ap.add_argument("--model", type=Path, help="also score this model directory on the re-simulated studies")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--observer", type=Path, help="a validation run's --out or --save-observer: apply its lesion "
                    "observer (design and thresholds) instead of choosing one on these studies")
    ap.add_argument("--save-observer", type=Path, help="write the lesion observer (design, thresholds) and this "
                    "command here, for --observer")
    ap.add_argument("--update-card", action="store_true", help="write the summary and this command into the "
                    "model's model.json (`cohort`)")
    a = ap.parse_args()
    if a.update_card and not a.model:
        ap.error("--update-card needs --model")
    torch.set_num_threads(a.threads)
    fixed = json.loads(a.observer.read_text())["lesion_observer"] if a.observer else None
    model = load_model(a.model, torch.device("cpu")) if a.model else None
    specs = plan_cases(a.cases, a.seed)
    if a.split_seed is not None:  # every phantom study pairs, so the data set's split is this one
        keep = set(split_patients([s.patient_id for s in specs], a.split_seed)[a.split])
        specs = [s for s in specs if s.patient_id in keep]
    if a.lesion_only:
        specs = [s for s in specs if s.lesion]
    specs = specs[:a.limit] if a.limit else specs
    values: dict[str, list[float]] = {}
    per_case = []
    for spec in specs:
        scores = score_case(spec, a.draws, model)
        per_case.append({"case": spec.case_id, "lesion": spec.lesion, "slices": spec.slices,
                         "myocardium_suv": round(scene(spec).anatomy.heart_suv, 2),
                         **{key: round(float(np.mean(vals)), 6 if key.endswith("_mse") or "_spine_" in key else 3)
                            for key, vals in scores.items() if vals}})
        for key, vals in scores.items():
            if "_spine_" not in key:  # per-study observer scores: summarised by lesion_observer
                values.setdefault(key, []).extend(vals)
    result = {"cases": len(specs), "slices": len(values.get("ceiling_psnr", [])),
              "split": a.split if a.split_seed is not None else None, "metric_note": imagemetrics.METRIC_NOTE}
    for key, vals in values.items():
        digits = 6 if key.endswith("_mse") else 3
        result[key] = {"mean": round(float(np.mean(vals)), digits), "sd": round(float(np.std(vals)), digits)}
    for key in [k for k in values if k.endswith("_mse")]:  # the MSE bound is exact for this aggregate
        result[key[:-4] + "_psnr_of_mean_mse"] = round(float(-10 * np.log10(np.mean(values[key]))), 3)
    if per_case:
        where = f"--cases {a.cases} --seed {a.seed}" + (f" --split-seed {a.split_seed} --split {a.split}"
                                                         if a.split_seed is not None else "")
        figures, result["lesion_observer"] = lesion_observer(per_case, fixed, f"of {where}")
        result.update(figures)
    result["per_case"] = per_case  # means over each study's slices
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    argv, skip = [], False  # the command that reproduces the results: without what only says where they go
    for arg in sys.argv[1:]:
        if not skip and arg not in ("--update-card", "--out", "--save-observer") and \
                not arg.startswith(("--out=", "--save-observer=")):
            argv.append(arg)
        skip = arg in ("--out", "--save-observer")
    command = " ".join(["python bench/bench_ceiling.py", *argv])
    if a.save_observer and "lesion_observer" in result:
        a.save_observer.write_text(json.dumps({"command": command, "lesion_observer": result["lesion_observer"]},
                                              indent=1) + "\n")
    if a.update_card:
        card = read_card(a.model)
        card["cohort"] = cohort_summary(result, command)
        write_card(a.model, card)


if __name__ == "__main__":
    main()
