"""Slice geometry in one place: where each slice lies, and whether slices form one consistent stack.

The selection rules, preprocessing and the training data set all use these functions, so a
series that passes selection is one that preprocessing accepts, with the same tolerances.
Values that are not finite (NaN, inf) are refused here, before they can reach an output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

ORIENTATION_TOL = 1e-3  # max |difference| of direction cosines between slices of one stack
SPACING_RTOL = 1e-3  # relative pixel-spacing tolerance between slices
DUPLICATE_TOL_MM = 1e-2  # slices closer than this along the normal share a position
UNEVEN_ABS_MM, UNEVEN_REL = 0.1, 0.05  # max - min slice gap beyond max(0.1 mm, 5 % of the median): uneven


class GeometryError(ValueError):
    """Missing, malformed or inconsistent geometry; the message says which slice and why."""


@dataclass(frozen=True)
class SliceGeometry:
    """Where one single-frame slice lies in the patient coordinate system (mm)."""

    rows: int
    cols: int
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing)
    position: tuple[float, float, float]  # Image Position (Patient): centre of the first pixel
    orientation: tuple[float, float, float, float, float, float]  # row then column direction cosines

    @property
    def normal(self) -> tuple[float, float, float]:
        n = np.cross(self.orientation[:3], self.orientation[3:])
        x, y, z = (float(v) for v in n / np.linalg.norm(n))
        return x, y, z

    @property
    def location(self) -> float:
        """Position along the slice normal, mm (what orders a stack)."""
        return float(np.dot(self.normal, self.position))


def _numbers(value, n: int, what: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise GeometryError(f"{what} is not numeric") from None
    if len(out) != n:
        raise GeometryError(f"{what} has {len(out)} values, not {n}")
    if not all(math.isfinite(v) for v in out):
        raise GeometryError(f"{what} is not finite ({', '.join(f'{v:g}' for v in out)})")
    return out


def make_geometry(rows, cols, pixel_spacing, position, orientation) -> SliceGeometry:
    """Validate raw values into a SliceGeometry (raises GeometryError)."""
    for what, value in (("Image Orientation (Patient)", orientation), ("Image Position (Patient)", position),
                        ("Pixel Spacing", pixel_spacing)):
        if value is None:
            raise GeometryError(f"no {what}")
    iop = _numbers(orientation, 6, "Image Orientation (Patient)")
    ipp = _numbers(position, 3, "Image Position (Patient)")
    spacing = _numbers(pixel_spacing, 2, "Pixel Spacing")
    if min(spacing) <= 0:
        raise GeometryError(f"Pixel Spacing must be positive, got {spacing}")
    if not 0.9 < float(np.linalg.norm(np.cross(iop[:3], iop[3:]))) < 1.1:
        raise GeometryError("Image Orientation (Patient) is not two orthogonal unit vectors")
    try:
        rows, cols = int(rows), int(cols)
    except (TypeError, ValueError):
        raise GeometryError("Rows/Columns missing") from None
    if rows < 1 or cols < 1:
        raise GeometryError(f"matrix {rows}x{cols} is empty")
    return SliceGeometry(rows, cols, spacing, ipp, iop)  # type: ignore[arg-type]


def slice_geometry(ds) -> SliceGeometry:
    """The geometry of a single-frame image data set (raises GeometryError)."""
    return make_geometry(ds.get("Rows"), ds.get("Columns"), ds.get("PixelSpacing"), ds.get("ImagePositionPatient"),
                         ds.get("ImageOrientationPatient"))


def plane_of(orientation: Sequence[float]) -> tuple[str, float]:
    """The anatomical plane nearest to the slice normal, and the angle (degrees) away from it."""
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    norm = float(np.linalg.norm(normal))
    if not math.isfinite(norm) or norm < 1e-6:
        return "invalid", 90.0
    normal = np.abs(normal / norm)
    axis = int(np.argmax(normal))
    return ("sagittal", "coronal", "axial")[axis], math.degrees(math.acos(min(1.0, float(normal[axis]))))


@dataclass(frozen=True)
class Stack:
    """Slices of one series, checked consistent and ordered along their common normal."""

    order: tuple[int, ...]  # indices into the input, in slice order
    slices: tuple[SliceGeometry, ...]  # in slice order
    normal: tuple[float, float, float]
    locations: tuple[float, ...]  # mm along the normal, ascending

    @property
    def gap(self) -> float:
        """Median distance between neighbouring slices, mm (0 for one slice)."""
        return float(np.median(np.diff(self.locations))) if len(self.locations) > 1 else 0.0


def stack_of(geometries: Sequence[SliceGeometry], names: Sequence[str] | None = None, *,
             require_even: bool = True) -> Stack:
    """Check that slices share orientation, matrix and pixel spacing, lie at distinct positions
    (and, with `require_even`, are evenly spaced), and order them along the normal."""
    if not geometries:
        raise GeometryError("no slices")
    names = list(names) if names is not None else [f"slice {i + 1}" for i in range(len(geometries))]
    ref = geometries[0]
    for g, name in zip(geometries, names):
        if np.max(np.abs(np.subtract(g.orientation, ref.orientation))) > ORIENTATION_TOL:
            raise GeometryError(f"{name}: Image Orientation (Patient) differs from the first slice")
        if (g.rows, g.cols) != (ref.rows, ref.cols):
            raise GeometryError(f"{name}: matrix {g.rows}x{g.cols} differs from {ref.rows}x{ref.cols}")
        if not np.allclose(g.pixel_spacing, ref.pixel_spacing, rtol=SPACING_RTOL, atol=0):
            raise GeometryError(f"{name}: Pixel Spacing {g.pixel_spacing} differs from {ref.pixel_spacing}")
    normal = ref.normal
    where = [float(np.dot(normal, g.position)) for g in geometries]
    order = sorted(range(len(geometries)), key=where.__getitem__)
    locations = [where[i] for i in order]
    for a, b, la, lb in zip(order, order[1:], locations, locations[1:]):
        if lb - la < DUPLICATE_TOL_MM:
            raise GeometryError(f"{names[a]} and {names[b]} lie at the same position ({la:.2f} mm along the normal)")
    gaps = np.diff(locations)
    if require_even and len(gaps) > 1 and gaps.max() - gaps.min() > max(UNEVEN_ABS_MM, UNEVEN_REL * float(np.median(gaps))):
        raise GeometryError(f"uneven slice spacing ({gaps.min():.2f}-{gaps.max():.2f} mm): a slice missing or extra")
    return Stack(tuple(order), tuple(geometries[i] for i in order), normal, tuple(locations))
