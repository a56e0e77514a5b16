"""PET/T2FS fusion rendering, as a reading workstation exports it.

Fixed, documented presentation (docs/user-guide/research/phantom.md):
- T2FS in grey through the MR series' own VOI window (Window Center/Width from its header;
  the phantom writes 0.5th..99.5th percentile of the series);
- PET in the "hot" colour map (black-red-yellow-white, matplotlib's `hot`) over SUV 0..7;
- constant PET opacity 0.5: rgb = (1 - 0.5) * grey + 0.5 * hot(SUV).
"""

from __future__ import annotations

import numpy as np

SUV_WINDOW = (0.0, 7.0)
OPACITY = 0.5


def hot_colormap(x: np.ndarray) -> np.ndarray:
    """[0, 1] -> float RGB in [0, 1] (..., 3); piecewise-linear matplotlib 'hot'."""
    x = np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0)
    r = np.clip(x / 0.365079, 0, 1)
    g = np.clip((x - 0.365079) / (0.746032 - 0.365079), 0, 1)
    b = np.clip((x - 0.746032) / (1 - 0.746032), 0, 1)
    return np.stack([r, g, b], axis=-1)


def window_unit(img: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM linear VOI window to [0, 1] (PS3.3 C.11.2.1.2, simplified to continuous)."""
    width = max(float(width), 1.0)
    return np.clip((np.asarray(img, dtype=np.float32) - (center - width / 2)) / width, 0.0, 1.0)


def render_fusion(t2_slice: np.ndarray, suv_slice: np.ndarray, *, t2_window: tuple[float, float] | None = None,
                  suv_window: tuple[float, float] = SUV_WINDOW, opacity: float = OPACITY) -> np.ndarray:
    """One PET/T2FS fusion image: (rows, cols) T2 and SUV -> uint8 RGB (rows, cols, 3).

    `t2_window` is (center, width) in stored MR values; None uses the slice's 0.5/99.5 percentiles.
    """
    t2 = np.asarray(t2_slice, dtype=np.float32)
    if t2_window is None:
        lo, hi = np.percentile(t2, [0.5, 99.5])
        t2_window = ((lo + hi) / 2, max(hi - lo, 1.0))
    grey = window_unit(t2, *t2_window)[..., None]
    lo, hi = suv_window
    pet = hot_colormap((np.asarray(suv_slice, dtype=np.float32) - lo) / max(hi - lo, 1e-6))
    rgb = (1.0 - opacity) * grey + opacity * pet
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)
