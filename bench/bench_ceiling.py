"""Benchmark: the best PSNR/SSIM any model can reach on the phantom, and what doing nothing gets.

The written fusion contains PET noise that no image-to-image model can predict from the MR. This
re-simulates the phantom studies (same seed, so the same cases as `dicomnode phantom`) and scores,
on the model grid with the evaluation's metrics (dicomnode.imagemetrics):

- ceiling: fusion rendered from the noise-free PET (true uptake after the scanner blur) against
  the written fusion. It also knows every uptake value (heart, lesion, marrow), which a model has
  to guess from the MR, so real models stay well below it;
- floor: fusion rendered with no PET at all (the grey T2FS through the same blend).

    python bench/bench_ceiling.py --cases 100 --seed 11 --manifest DATA/manifest.json --split test
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from dicomnode import imagemetrics
from dicomnode.engine.grid import GridPlacement
from dicomnode.phantom.fusion import render_fusion
from dicomnode.phantom.generate import plan_cases, simulate


def _grid_unit(place: GridPlacement, rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(place.to_grid(np.moveaxis(rgb, -1, 0).astype(np.float32), fill=0.0) / 255.0)


def score_case(spec) -> dict[str, list[float]]:
    """Per-slice PSNR/SSIM of the ceiling and the floor for one simulated study."""
    sim = simulate(spec)
    g = sim.grid
    sigma = sim.meta["pet_fwhm_mm"] / 2.3548
    clean = ndimage.gaussian_filter(sim.suv_true, (sigma / g.slice_spacing, sigma / g.row_spacing,
                                                   sigma / g.col_spacing), mode="nearest")
    lo, hi = (float(v) for v in np.percentile(sim.mr, [0.5, 99.5]))
    window = (float(round((lo + hi) / 2)), float(max(round(hi - lo), 1)))
    place = GridPlacement.for_image(spec.rows, spec.cols, (g.row_spacing, g.col_spacing))
    real, ceiling, floor = [], [], []
    for k in range(spec.slices):
        real.append(_grid_unit(place, render_fusion(sim.mr[k], sim.suv[k], t2_window=window)))
        ceiling.append(_grid_unit(place, render_fusion(sim.mr[k], clean[k], t2_window=window)))
        floor.append(_grid_unit(place, render_fusion(sim.mr[k], np.zeros_like(clean[k]), t2_window=window)))
    real_t = torch.stack(real)
    out = {}
    for name, pred in (("ceiling", torch.stack(ceiling)), ("floor", torch.stack(floor))):
        m = imagemetrics.all_metrics(real_t, pred)
        out[f"{name}_psnr"] = np.ravel(m["psnr"]).tolist()
        out[f"{name}_ssim"] = np.ravel(m["ssim"]).tolist()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=100, help="as given to `dicomnode phantom --cases`")
    ap.add_argument("--seed", type=int, default=11, help="as given to `dicomnode phantom --seed`")
    ap.add_argument("--manifest", type=Path, help="data set manifest.json: score only the patients of --split")
    ap.add_argument("--split", default="test")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    a = ap.parse_args()
    specs = plan_cases(a.cases, a.seed)
    if a.manifest:
        keep = set(json.loads(a.manifest.read_text())["splits"][a.split])
        specs = [s for s in specs if s.patient_id in keep]
    values: dict[str, list[float]] = {}
    for spec in specs:
        for key, vals in score_case(spec).items():
            values.setdefault(key, []).extend(vals)
    result = {"cases": len(specs), "slices": len(values.get("ceiling_psnr", [])), "split": a.split if a.manifest else None,
              "metric_note": imagemetrics.METRIC_NOTE}
    for key, vals in values.items():
        result[key] = {"mean": round(float(np.mean(vals)), 3), "sd": round(float(np.std(vals)), 3)}
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
