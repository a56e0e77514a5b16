"""Scanner physics: PET resolution and noise, SUV <-> Bq/ml, and the MR coil and noise model."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from dicomnode.tools.phantom.grid import SliceGrid

F18_HALF_LIFE_S = 6586.2


def pet_acquire(suv_true: np.ndarray, grid: SliceGrid, fwhm_mm: float, noise: float,
                rng: np.random.Generator) -> np.ndarray:
    """True SUV -> measured SUV: Gaussian system blur of `fwhm_mm` and signal-dependent,
    spatially correlated noise (relative level `noise` at SUV 1), clipped at zero."""
    sigma_mm = fwhm_mm / 2.3548
    sig = (sigma_mm / grid.slice_spacing, sigma_mm / grid.row_spacing, sigma_mm / grid.col_spacing)
    blurred = ndimage.gaussian_filter(suv_true, sig, mode="nearest")
    n = rng.standard_normal(suv_true.shape, dtype=np.float32)
    corr = (0.0, 1.2 / grid.row_spacing, 1.2 / grid.col_spacing)  # noise grain ~ a PET voxel
    n = ndimage.gaussian_filter(n, corr, mode="wrap")
    n /= max(float(n.std()), 1e-6)
    out = blurred + np.float32(noise) * np.sqrt(np.maximum(blurred, 0.05)) * n
    return np.maximum(out, 0).astype(np.float32)


def suv_scale_bqml(weight_kg: float, dose_bq: float, uptake_s: float) -> float:
    """Bq/ml per SUV unit (body weight SUV, decay corrected to the series start):
    Bq/ml = SUV * dose * 2^(-uptake_s / T1/2) / (weight_kg * 1000 g)."""
    return dose_bq * 2.0 ** (-uptake_s / F18_HALF_LIFE_S) / (weight_kg * 1000.0)


def mr_acquire(clean: np.ndarray, grid: SliceGrid, gain: float, noise: float,
               rng: np.random.Generator) -> np.ndarray:
    """Relative signal -> 12-bit magnitude image: smooth coil bias field (posterior spine coil,
    falling off anteriorly and towards the ends of the field of view) and Rician noise."""
    X, Y, Z = grid.coords()
    cx, cy, cz = grid.center
    a_y, a_z, a_x = rng.uniform(0.25, 0.6), rng.uniform(0.2, 0.6), rng.uniform(-0.1, 0.1)
    bias = np.exp(np.float32(a_y) * (Y - cy) / 150 - np.float32(a_z) * ((Z - cz) / 220) ** 2
                  + np.float32(a_x) * (X - cx) / 100).astype(np.float32)
    sig = clean * bias * np.float32(gain)
    sd = np.float32(noise * gain)
    re = sig + sd * rng.standard_normal(clean.shape, dtype=np.float32)
    im = sd * rng.standard_normal(clean.shape, dtype=np.float32)
    mag = np.sqrt(re * re + im * im)
    return np.clip(np.rint(mag), 0, 4095).astype(np.uint16)
