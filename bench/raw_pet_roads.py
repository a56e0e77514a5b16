"""Two roads to a training fusion, compared on the phantom: the workstation's fusion SC (PET
simulated at the MR's resolution) against the fusion `build-dataset --from raw-pet` renders from
the scanner's axial PET (2-4 mm voxels), and the same with the SC road brought to the PET's
resolution, so the share of the difference that is resolution shows.

    python bench/raw_pet_roads.py --cases 40 --seed 2027 [--json out.json]

For each study of the phantom plan (nothing is read from disk; the simulation is repeated):
- `sc`: the fusion SC's pixels (MR-grid SUV, quantised as stored);
- `raw`: the scanner's PET resampled onto the MR slices (SimpleITK, linear), as build-dataset does;
- `sc@pet`: the MR-grid SUV sampled at the PET's voxel centres (linear) and resampled back onto
  the MR slices: the SC road at the PET's resolution;
once with the phantom's PET noise and once without (noise off on both grids, so what remains is
resolution and sampling). All on the 256 model grid, PSNR and SSIM as in training.evaluate.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import importlib  # noqa: E402

from dicomnode.geometry import make_geometry  # noqa: E402
from dicomnode.infer.grid import GridPlacement  # noqa: E402
from dicomnode.tools.fusion import render_fusion  # noqa: E402
from dicomnode.tools.imagemetrics import psnr, ssim  # noqa: E402
from dicomnode.tools.phantom.writers import stored_suv  # noqa: E402
from training.rawpet import _image, sitk  # noqa: E402

gen = importlib.import_module("dicomnode.tools.phantom.generate")  # the module (the package exports a function of that name)


def _grid_image(grid, volume: np.ndarray):
    geoms = [make_geometry(grid.rows, grid.cols, grid.pixel_spacing, pos, grid.iop) for pos in grid.positions()]
    return _image(geoms, [float(np.dot(p, grid.normal)) for p in grid.positions()], volume.astype(np.float32))


def _resample(src_img, ref_img):
    S = sitk()
    return S.GetArrayFromImage(S.Resample(src_img, ref_img, S.Transform(), S.sitkLinear, 0.0, S.sitkFloat32))


def _to_grid(rgb: np.ndarray, grid) -> np.ndarray:
    place = GridPlacement.for_image(grid.rows, grid.cols, grid.pixel_spacing)
    return np.stack([place.to_grid(np.moveaxis(x, -1, 0).astype(np.float32), fill=0.0) / 255.0 for x in rgb])


def roads(spec) -> dict[str, np.ndarray]:
    sim = gen.simulate(spec)
    lo, hi = (float(v) for v in np.percentile(sim.mr, [0.5, 99.5]))
    window = (float(round((lo + hi) / 2)), float(max(round(hi - lo), 1)))
    per_suv = gen._case_header(spec, sim.grid, sim.pet_grid.slices)["bqml_per_suv"]
    mr_img = _grid_image(sim.grid, np.zeros(sim.grid.shape))
    pet_img = _grid_image(sim.pet_grid, stored_suv(sim.pet_suv, per_suv))
    sc_suv = stored_suv(sim.suv, per_suv)
    raw_suv = _resample(pet_img, mr_img)
    on_pet = _resample(_grid_image(sim.grid, sc_suv), _grid_image(sim.pet_grid, np.zeros(sim.pet_grid.shape)))
    sc_at_pet = _resample(_grid_image(sim.pet_grid, on_pet), mr_img)

    def render(suv):
        return _to_grid(np.stack([render_fusion(sim.mr[k], suv[k], t2_window=window) for k in range(spec.slices)]),
                        sim.grid)
    return {"sc": render(sc_suv), "raw": render(raw_suv), "sc@pet": render(sc_at_pet)}


def compare(a: list[np.ndarray], b: list[np.ndarray]) -> dict[str, float]:
    x, y = torch.from_numpy(np.concatenate(a)), torch.from_numpy(np.concatenate(b))
    return {"psnr": round(float(np.mean(psnr(x, y))), 2), "ssim": round(float(np.mean(ssim(x, y))), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--seed", type=int, default=2027)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(2)
    specs = gen.plan_cases(a.cases, a.seed)
    acquire = gen.pet_acquire
    out: dict[str, dict] = {}
    t0 = time.perf_counter()
    for noise in ("with noise", "noise off"):
        if noise == "noise off":
            gen.pet_acquire = lambda suv, grid, fwhm, _noise, rng: acquire(suv, grid, fwhm, 0.0, rng)  # type: ignore[assignment]
        got: dict[str, list[np.ndarray]] = {"sc": [], "raw": [], "sc@pet": []}
        for spec in specs:
            for k, v in roads(spec).items():
                got[k].append(v)
        out[noise] = {"raw vs sc": compare(got["raw"], got["sc"]), "raw vs sc@pet": compare(got["raw"], got["sc@pet"]),
                      "sc@pet vs sc": compare(got["sc@pet"], got["sc"]),
                      "slices": int(sum(len(v) for v in got["sc"]))}
    gen.pet_acquire = acquire
    out["seconds"] = round(time.perf_counter() - t0, 1)  # type: ignore[assignment]
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
