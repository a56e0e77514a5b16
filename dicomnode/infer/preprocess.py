"""From one received DICOM series to the model batch, and from model outputs back to slices.

Slices are ordered by their position along the slice normal (Instance Number is not reliable
across vendors), decoded whatever their transfer syntax, rescaled, normalised per series and
placed on the model grid with `dicomnode.infer.grid`, exactly as training does.
"""

from __future__ import annotations

from dataclasses import dataclass
from os import PathLike
from typing import Sequence

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.pixels import apply_rescale

from dicomnode.frames import FrameError, expand, frame_of
from dicomnode.geometry import GeometryError, SliceGeometry, slice_geometry, stack_of
from dicomnode.infer.grid import MODEL_GRID, GridPlacement, normalize_series, unit_to_rgb


class SeriesError(ValueError):
    """The series cannot be turned into a model batch; the message says which instance and why."""


@dataclass(frozen=True)
class PreparedSeries:
    """A series ready for the model: ordered sources, the (S, 1, G, G) batch and how to undo it."""

    datasets: tuple[Dataset, ...]
    batch: np.ndarray
    placements: tuple[GridPlacement, ...]
    geometry: tuple[SliceGeometry, ...]
    normal: tuple[float, float, float]

    def __len__(self) -> int:
        return len(self.datasets)


def prepare_series(items: Sequence[Dataset | str | PathLike], size: int = MODEL_GRID) -> PreparedSeries:
    """Read, check, order, decode and normalise one series; raise SeriesError on bad input."""
    if not items:
        raise SeriesError("empty series")
    read = [_read(item) for item in items]
    try:  # an Enhanced MR instance becomes one slice per frame (dicomnode.frames)
        views = [(view, item) for ds, item in zip(read, items) for view in expand([ds])]
    except FrameError as exc:
        raise SeriesError(str(exc)) from None
    except Exception as exc:  # undecodable multi-frame pixel data
        raise SeriesError(f"cannot read the frames of a multi-frame instance: {exc}") from None
    datasets, items = [v for v, _ in views], [i for _, i in views]
    names = [_name(ds, item) for ds, item in zip(datasets, items)]
    _check_members(datasets, names)
    try:
        stack = stack_of([_geometry(ds, name) for ds, name in zip(datasets, names)], names, require_even=False)
    except GeometryError as exc:
        raise SeriesError(str(exc)) from None
    datasets = [datasets[i] for i in stack.order]
    items = [items[i] for i in stack.order]
    geoms, normal = list(stack.slices), stack.normal
    volume = np.stack([_pixels(ds, _name(ds, item)) for ds, item in zip(datasets, items)])
    volume = normalize_series(volume)
    placements = [GridPlacement.for_image(g.rows, g.cols, g.pixel_spacing, size=size) for g in geoms]
    batch = np.stack([p.to_grid(s) for p, s in zip(placements, volume)])[:, None].astype(np.float32)
    return PreparedSeries(tuple(datasets), batch, tuple(placements), tuple(geoms), normal)


def outputs_to_rgb(prepared: PreparedSeries, outputs: np.ndarray) -> list[np.ndarray]:
    """Model outputs (S, 3, G, G) in [-1, 1] -> one uint8 (Rows, Columns, 3) image per source slice."""
    out = np.asarray(outputs, dtype=np.float32)
    if out.ndim != 4 or out.shape[0] != len(prepared) or out.shape[1] != 3:
        raise ValueError(f"expected outputs of shape ({len(prepared)}, 3, G, G), got {out.shape}")
    return [unit_to_rgb(p.from_grid(o)) for p, o in zip(prepared.placements, out)]


def _read(item: Dataset | str | PathLike) -> Dataset:
    if isinstance(item, Dataset):
        return item
    try:
        ds = dcmread(item)
    except Exception as exc:  # pydicom raises many types for damaged files
        raise SeriesError(f"cannot read {item}: {exc}") from exc
    if "PixelData" not in ds:  # dcmread stops quietly at a cut inside the header
        raise SeriesError(f"{_name(ds, item)}: no Pixel Data (file truncated or not an image)")
    return ds


def _name(ds: Dataset, item: object) -> str:
    """Identify an instance without patient data: file name if any, Instance Number and SOP UID."""
    where = f"{item} " if not isinstance(item, Dataset) else ""
    frame = f"frame {frame_of(ds)} of " if frame_of(ds) is not None else ""
    return f"{frame}instance {where}(#{ds.get('InstanceNumber', '?')}, {ds.get('SOPInstanceUID', '?')})"


def _geometry(ds: Dataset, name: str) -> SliceGeometry:
    try:
        return slice_geometry(ds)
    except GeometryError as exc:
        raise SeriesError(f"{name}: missing or invalid geometry: {exc}") from None


def _check_members(datasets: list[Dataset], names: list[str]) -> None:
    """One series, each instance once, single-frame greyscale."""
    ref = datasets[0]
    seen: set[str] = set()
    for ds, name in zip(datasets, names):
        if ds.get("SeriesInstanceUID") != ref.get("SeriesInstanceUID"):
            raise SeriesError(f"{name} belongs to another series")
        key = f"{ds.get('SOPInstanceUID')}#{frame_of(ds)}"
        if key in seen:
            raise SeriesError(f"{name} appears twice")
        seen.add(key)
        if int(ds.get("SamplesPerPixel", 1)) != 1 or int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise SeriesError(f"{name}: only single-frame greyscale images are supported")


def _pixels(ds: Dataset, name: str) -> np.ndarray:
    """Decode and rescale one slice; any decoder failure names the instance."""
    try:
        arr = ds.pixel_array
    except Exception as exc:  # truncated or undecodable pixel data, missing plugin
        ts = getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID")
        raise SeriesError(f"{name}: cannot decode pixel data ({ts.name if ts else 'unknown transfer syntax'})"
                          f": {exc}") from exc
    if arr.shape != (ds.Rows, ds.Columns):
        raise SeriesError(f"{name}: decoded shape {arr.shape} is not {ds.Rows}x{ds.Columns}")
    arr = np.asarray(apply_rescale(arr, ds), dtype=np.float32)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        arr = -arr  # brighter = higher signal, as for MONOCHROME2; normalisation is linear
    return arr
