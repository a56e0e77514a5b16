"""The model grid: intensity normalisation and resampling shared by training and inference.

Training data (training/data.py) and the inference pipeline both call these functions, so a
slice is seen by the network in exactly the same way in both places.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

MODEL_GRID = 256
NORM_LOW_PCT = 0.5
NORM_HIGH_PCT = 99.5


def normalize_series(volume: np.ndarray) -> np.ndarray:
    """Map an MR series (slices, rows, cols; any real dtype) to float32 in [-1, 1].

    Per-series robust scaling: the 0.5th and 99.5th percentiles of the series map to -1 and 1 and the
    result is clipped, so one hot voxel or a different scanner gain does not
    change the picture the network sees.
    """
    vol = np.asarray(volume, dtype=np.float32)
    lo, hi = (float(v) for v in np.percentile(vol, [NORM_LOW_PCT, NORM_HIGH_PCT]))
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((vol - lo) / (hi - lo) * 2.0 - 1.0, -1.0, 1.0).astype(np.float32)


def rgb_to_unit(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB (..., 3) -> float32 channels-first (3, ...) in [-1, 1]."""
    return (np.moveaxis(np.asarray(rgb, dtype=np.float32), -1, 0) / 127.5 - 1.0).astype(np.float32)


def unit_to_rgb(chw: np.ndarray) -> np.ndarray:
    """float (3, H, W) in [-1, 1] -> uint8 (H, W, 3)."""
    arr = np.clip((np.asarray(chw, dtype=np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return np.moveaxis(arr, 0, -1)


@dataclass(frozen=True)
class GridPlacement:
    """Where a (rows, cols) image with a pixel spacing sits on the square model grid."""

    rows: int
    cols: int
    scaled_rows: int
    scaled_cols: int
    top: int
    left: int
    size: int

    @classmethod
    def for_image(cls, rows: int, cols: int, pixel_spacing: tuple[float, float] = (1.0, 1.0),
                  size: int = MODEL_GRID) -> "GridPlacement":
        """Fit the longer physical side to `size`, keep the physical aspect ratio, centre it."""
        if rows < 1 or cols < 1:
            raise ValueError(f"image must have positive size, got {rows}x{cols}")
        dy, dx = (float(pixel_spacing[0]), float(pixel_spacing[1])) if pixel_spacing else (1.0, 1.0)
        if dy <= 0 or dx <= 0:
            dy = dx = 1.0
        height_mm, width_mm = rows * dy, cols * dx
        scale = size / max(height_mm, width_mm)
        sr = max(1, min(size, int(round(height_mm * scale))))
        sc = max(1, min(size, int(round(width_mm * scale))))
        return cls(rows, cols, sr, sc, (size - sr) // 2, (size - sc) // 2, size)

    def to_grid(self, image: np.ndarray, fill: float = -1.0) -> np.ndarray:
        """(rows, cols) or (C, rows, cols) float image -> (…, size, size) on the grid."""
        img = np.asarray(image, dtype=np.float32)
        chans = img[None] if img.ndim == 2 else img
        out = np.full((chans.shape[0], self.size, self.size), fill, dtype=np.float32)
        for c, plane in enumerate(chans):
            out[c, self.top:self.top + self.scaled_rows, self.left:self.left + self.scaled_cols] = \
                _resize(plane, self.scaled_rows, self.scaled_cols)
        return out[0] if img.ndim == 2 else out

    def from_grid(self, grid: np.ndarray) -> np.ndarray:
        """Inverse of to_grid: crop the placed region and resize back to (rows, cols)."""
        arr = np.asarray(grid, dtype=np.float32)
        chans = arr[None] if arr.ndim == 2 else arr
        crop = chans[:, self.top:self.top + self.scaled_rows, self.left:self.left + self.scaled_cols]
        out = np.stack([_resize(p, self.rows, self.cols) for p in crop])
        return out[0] if arr.ndim == 2 else out


def _resize(plane: np.ndarray, rows: int, cols: int) -> np.ndarray:
    if plane.shape == (rows, cols):
        return plane.astype(np.float32, copy=True)
    shrinking = rows < plane.shape[0] or cols < plane.shape[1]
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(plane.astype(np.float32), mode="F").resize((cols, rows), resample),
                      dtype=np.float32)
