"""PET as the scanner wrote it -> SUV on every slice of the T2FS series -> the fusion image.

The PET series is stacked by its own slice geometry (`dicomnode.geometry`), converted to SUVbw by
the QIBA rules (`dicomnode.tools.suv`), and resampled onto the MR slices in patient coordinates
with SimpleITK (linear). The fusion is drawn by the one renderer the phantom's fusion SCs use
(`dicomnode.tools.fusion.render_fusion`). A study that cannot be converted raises `PetRefused`
with a reason naming the tag; nothing is guessed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicomnode.geometry import GeometryError, SliceGeometry, slice_geometry, stack_of
from dicomnode.tools.fusion import OPACITY, SUV_WINDOW, render_fusion
from dicomnode.tools.suv import SuvError, SuvScale, series_scale, suv_image


class PetRefused(Exception):
    """The PET of a study cannot be turned into fusions; the message is the reported reason."""


def sitk():
    try:
        import SimpleITK
    except ImportError:  # an optional extra of the training code
        raise SystemExit("pairing raw PET needs SimpleITK: pip install 'simpleitk>=2.3'") from None
    return SimpleITK


def render_settings() -> dict:
    """What the manifest records about the fusion drawing."""
    return {"renderer": "dicomnode.tools.fusion.render_fusion", "colour_map": "hot", "suv_window": list(SUV_WINDOW),
            "opacity": OPACITY, "t2_window": "the MR's Window Center/Width, else its 0.5-99.5 percentiles"}


def resampling_settings() -> dict:
    return {"library": f"SimpleITK {sitk().Version.VersionString()}", "interpolator": "linear",
            "space": "patient (LPS), PET stacked by Image Position (Patient)", "suv": "QIBA SUVbw"}


def _image(geoms: Sequence[SliceGeometry], locations: Sequence[float], volume: np.ndarray | None = None):
    """A SimpleITK image on the stack's grid (slices ascending along the normal)."""
    g0 = geoms[0]
    row, col = np.asarray(g0.orientation[:3]), np.asarray(g0.orientation[3:])
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    gap = float(np.median(np.diff(locations))) if len(locations) > 1 else 1.0
    S = sitk()
    img = S.GetImageFromArray(np.zeros((len(geoms), g0.rows, g0.cols), np.float32) if volume is None else volume)
    img.SetSpacing((g0.pixel_spacing[1], g0.pixel_spacing[0], gap))
    img.SetOrigin(tuple(float(v) for v in g0.position))
    img.SetDirection(tuple(float(v) for v in np.stack([row, col, normal], axis=1).ravel()))
    return img


@dataclass
class PetVolume:
    image: Any  # SimpleITK.Image of SUVbw (SimpleITK is an optional extra)
    scale: SuvScale
    slices: int


def pet_volume(datasets: Sequence[Dataset]) -> PetVolume:
    """Stack one PT series (full data sets, pixels included) into an SUV volume (raises PetRefused)."""
    try:
        geoms = [slice_geometry(ds) for ds in datasets]
        stack = stack_of(geoms, [f"PT image #{ds.get('InstanceNumber', '?')}" for ds in datasets])
    except GeometryError as exc:
        raise PetRefused(f"PT slices inconsistent: {exc}") from None
    try:
        scale = series_scale(datasets)
    except SuvError as exc:
        raise PetRefused(f"PT: {exc}") from None
    try:
        volume = np.stack([suv_image(datasets[i], scale) for i in stack.order])
    except (AttributeError, ValueError) as exc:
        raise PetRefused(f"PT PixelData (7FE0,0010) unreadable: {exc}") from None
    return PetVolume(_image(list(stack.slices), stack.locations, volume), scale, len(datasets))


def suv_on_mr(pet: PetVolume, mr: Sequence[Dataset]) -> np.ndarray:
    """SUV resampled onto every MR slice (slices in the order given): (slices, rows, cols).

    Along the PET's own axis every MR slice must lie within the PET slab (half a slice of margin):
    a missing bed position is refused, not filled. Across it, the PET's reconstructed field of view
    is the bore; an MR field of view reaching past it (air) takes the nearest PET value."""
    S = sitk()
    image = pet.image
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    axis = direction[:, 2]
    first = float(np.dot(axis, image.GetOrigin()))
    half = image.GetSpacing()[2] / 2
    lo, hi = first - half, first + (image.GetSize()[2] - 1) * image.GetSpacing()[2] + half
    geoms = [slice_geometry(ds) for ds in mr]
    out = []
    for g in geoms:  # one 2-D slice at a time: MR slices need not be evenly spaced for this
        corners = [np.asarray(g.position) + r * g.pixel_spacing[0] * np.asarray(g.orientation[3:])
                   + c * g.pixel_spacing[1] * np.asarray(g.orientation[:3])
                   for r in (0, g.rows - 1) for c in (0, g.cols - 1)]
        along = [float(np.dot(axis, p)) for p in corners]
        if min(along) < lo - 1e-3 or max(along) > hi + 1e-3:
            inside = max(0.0, min(hi, max(along)) - max(lo, min(along))) / max(max(along) - min(along), 1e-6)
            raise PetRefused(f"the PT series covers {lo:.1f} to {hi:.1f} mm along its axis, the MR slice at "
                             f"{g.location:.1f} mm spans {min(along):.1f} to {max(along):.1f} mm ({inside:.0%} covered): "
                             "a bed position is missing")
        ref = _image([g], [0.0])
        res = S.Resample(image, ref, S.Transform(), S.sitkLinear, 0.0, S.sitkFloat32, True)
        out.append(S.GetArrayFromImage(res)[0])
    return np.stack(out)


def t2_window(mr: Sequence[Dataset], volume: np.ndarray) -> tuple[float, float]:
    """(center, width) of the T2 grey: the series' own VOI window, else its 0.5-99.5 percentiles."""
    first = mr[0]
    try:
        c, w = (float(v[0] if isinstance(v, MultiValue) else v) for v in (first.WindowCenter, first.WindowWidth))
        if w > 0:
            return c, w
    except (AttributeError, TypeError, ValueError):
        pass
    lo, hi = (float(v) for v in np.percentile(volume, [0.5, 99.5]))
    return (lo + hi) / 2, max(hi - lo, 1.0)


def fusion_slices(mr: Sequence[Dataset], mr_pixels: np.ndarray, pet: PetVolume) -> np.ndarray:
    """(slices, rows, cols, 3) uint8 fusions of the MR slices with the resampled PET."""
    suv = suv_on_mr(pet, mr)
    window = t2_window(mr, mr_pixels)
    return np.stack([render_fusion(mr_pixels[k], suv[k], t2_window=window) for k in range(len(mr))])
