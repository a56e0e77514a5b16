"""Enhanced MR as slices: a multi-frame Enhanced MR Image or Legacy Converted Enhanced MR Image
seen as one classic single-frame header per frame, so the rules, the geometry and the
synthesiser read it as they read classic MR Image Storage.

Each frame's view holds the instance's top-level attributes (patient, study, series, pulse
sequence, ...), then what its functional groups say for that frame, shared groups first and the
frame's own groups over them: Image Position and Orientation (Patient), Pixel Spacing, Slice
Thickness, the rescale and window, Repetition Time and Flip Angle, Echo Time (Effective Echo
Time), the inversion, and the converted classic attributes a Legacy Converted image carries. Its
SOP Class and SOP Instance UIDs stay the source instance's; `frame_of(view)` gives its frame
number (1-based), so an output can reference its source instance and frame.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from pydicom import Dataset
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
LEGACY_CONVERTED_ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.4"
MULTIFRAME_MR = frozenset({ENHANCED_MR, LEGACY_CONVERTED_ENHANCED_MR})

# functional group macro -> the attributes lifted from it, as (keyword in the view, keyword in the macro)
LIFTED: dict[str, tuple[tuple[str, str], ...]] = {
    "PlanePositionSequence": (("ImagePositionPatient", "ImagePositionPatient"),),
    "PlaneOrientationSequence": (("ImageOrientationPatient", "ImageOrientationPatient"),),
    "PixelMeasuresSequence": (("PixelSpacing", "PixelSpacing"), ("SliceThickness", "SliceThickness"),
                              ("SpacingBetweenSlices", "SpacingBetweenSlices")),
    "PixelValueTransformationSequence": (("RescaleIntercept", "RescaleIntercept"), ("RescaleSlope", "RescaleSlope"),
                                         ("RescaleType", "RescaleType")),
    "FrameVOILUTSequence": (("WindowCenter", "WindowCenter"), ("WindowWidth", "WindowWidth")),
    "MRTimingAndRelatedParametersSequence": (("RepetitionTime", "RepetitionTime"), ("FlipAngle", "FlipAngle"),
                                             ("EchoTrainLength", "EchoTrainLength")),
    "MREchoSequence": (("EchoTime", "EffectiveEchoTime"),),
    "MRModifierSequence": (("InversionRecovery", "InversionRecovery"),),
}
CONVERTED = ("UnassignedSharedConvertedAttributesSequence", "UnassignedPerFrameConvertedAttributesSequence")
DROPPED = {"PixelData", "NumberOfFrames", "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
           "DimensionIndexSequence", "DimensionOrganizationSequence", "DimensionOrganizationType",
           "FloatPixelData", "DoubleFloatPixelData"}


class FrameError(ValueError):
    """A multi-frame instance whose frames cannot be told apart (no per-frame functional groups)."""


def is_multiframe_mr(ds: Dataset) -> bool:
    return str(ds.get("SOPClassUID", "")) in MULTIFRAME_MR and int(ds.get("NumberOfFrames", 1) or 1) >= 1


def frame_of(ds: Dataset) -> int | None:
    """The frame number (1-based) a view was made from; None for a classic instance."""
    return getattr(ds, "_dicomnode_frame", None)


def _first(value):
    """The first value of a multi-valued element (pydicom gives a MultiValue or a single value)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        return value
    return value[0] if len(value) else None


def _lift(view: Dataset, group: Dataset) -> None:
    """Copy into `view` what one functional group item (shared or per-frame) says."""
    for macro, pairs in LIFTED.items():
        items = group.get(macro)
        if not items:
            continue
        item = items[0]
        for dest, src in pairs:
            if src in item and item[src].value not in (None, ""):
                tag = tag_for_keyword(dest)
                assert tag is not None  # LIFTED names dictionary keywords
                view[tag] = DataElement(tag, dictionary_VR(tag), item[src].value)
        if macro == "MRModifierSequence" and str(item.get("InversionRecovery", "")).upper() == "YES":
            first = _first(item.get("InversionTimes"))
            if first is not None:
                view.InversionTime = float(first)
    for macro in CONVERTED:
        for item in group.get(macro, [])[:1]:
            for elem in item:
                view[elem.tag] = elem


def frame_views(ds: Dataset, pixels: bool = True) -> list[Dataset]:
    """One classic single-frame view per frame of a multi-frame MR instance (in frame order)."""
    n = int(ds.get("NumberOfFrames", 1) or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    if per_frame is None or len(per_frame) != n:
        raise FrameError(f"instance #{ds.get('InstanceNumber', '?')}: {n} frames but "
                         f"{0 if per_frame is None else len(per_frame)} per-frame functional group items")
    frames = None
    if pixels and "PixelData" in ds:
        frames = np.asarray(ds.pixel_array)
        if n == 1:
            frames = frames[None]
    base = Dataset()
    for elem in ds:
        if elem.keyword not in DROPPED:
            base.add(elem)
    views = []
    for k in range(n):
        view = Dataset()
        for elem in base:
            view.add(elem)
        if shared:
            _lift(view, shared[0])
        _lift(view, per_frame[k])
        view.SOPClassUID, view.SOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        if "InstanceNumber" in ds:  # the instance's, not a converted source slice's
            view.InstanceNumber = ds.InstanceNumber
        view.NumberOfFrames = 1
        if frames is not None:
            arr = frames[k]
            view.file_meta = FileMetaDataset()
            view.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            view.PixelData = np.ascontiguousarray(arr).tobytes()
        object.__setattr__(view, "_dicomnode_frame", k + 1)
        views.append(view)
    return views


def expand(datasets: Iterable[Dataset], pixels: bool = True) -> list[Dataset]:
    """The datasets with every multi-frame MR instance replaced by its frame views."""
    out: list[Dataset] = []
    for ds in datasets:
        out.extend(frame_views(ds, pixels) if is_multiframe_mr(ds) else [ds])
    return out


def label(ds: Dataset) -> str:
    """How a log line or a rule's reason names an instance or a frame (no patient data)."""
    frame = frame_of(ds)
    where = f"instance #{ds.get('InstanceNumber', '?')}"
    return f"frame {frame} of {where}" if frame is not None else where


def frames_in(headers: Sequence[Dataset]) -> int:
    return sum(int(ds.get("NumberOfFrames", 1) or 1) for ds in headers)
