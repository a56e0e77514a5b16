"""Slice geometry of a phantom series: DICOM plane attributes and voxel coordinates in mm.

Coordinates come back as broadcastable arrays (each axis only varies along the array axes that
its direction cosines touch), so a sagittal series costs 2-D, not 3-D, work for most structures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Row cosine, column cosine (LPS patient coordinates) of the three standard planes.
ORIENTATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),  # rows run anterior->posterior, head at top
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
}
PATIENT_ORIENTATION = {"sagittal": ("P", "F"), "axial": ("L", "P"), "coronal": ("L", "F")}


@dataclass(frozen=True)
class SliceGrid:
    """A stack of parallel slices: matrix, spacing and the position of every slice."""

    orientation: str
    slices: int
    rows: int
    cols: int
    row_spacing: float  # mm between rows (DICOM PixelSpacing[0])
    col_spacing: float  # mm between columns (DICOM PixelSpacing[1])
    thickness: float
    slice_spacing: float
    center: tuple[float, float, float]

    @property
    def row_cosine(self) -> np.ndarray:
        return np.array(ORIENTATIONS[self.orientation][0])

    @property
    def col_cosine(self) -> np.ndarray:
        return np.array(ORIENTATIONS[self.orientation][1])

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_cosine, self.col_cosine)

    @property
    def iop(self) -> list[float]:
        return [float(v) for v in (*self.row_cosine, *self.col_cosine)]

    @property
    def pixel_spacing(self) -> tuple[float, float]:
        return (self.row_spacing, self.col_spacing)

    def positions(self) -> np.ndarray:
        """(slices, 3) Image Position (Patient) of every slice, ascending along the normal."""
        c = np.asarray(self.center, dtype=np.float64)
        first = (c - (self.cols - 1) / 2 * self.col_spacing * self.row_cosine
                 - (self.rows - 1) / 2 * self.row_spacing * self.col_cosine
                 - (self.slices - 1) / 2 * self.slice_spacing * self.normal)
        return first + np.arange(self.slices)[:, None] * self.slice_spacing * self.normal

    def coords(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable float32 X, Y, Z (mm) of every voxel (slice, row, col)."""
        first = self.positions()[0]
        k = np.arange(self.slices, dtype=np.float32)[:, None, None] * self.slice_spacing
        r = np.arange(self.rows, dtype=np.float32)[None, :, None] * self.row_spacing
        c = np.arange(self.cols, dtype=np.float32)[None, None, :] * self.col_spacing
        out = []
        for axis in range(3):
            acc = np.full((1, 1, 1), first[axis], dtype=np.float32)
            for vec, term in ((self.normal, k), (self.col_cosine, r), (self.row_cosine, c)):
                if abs(vec[axis]) > 1e-9:
                    acc = acc + np.float32(vec[axis]) * term
            out.append(acc.astype(np.float32))
        return out[0], out[1], out[2]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.slices, self.rows, self.cols)
