"""The phantom's MR series as one multi-frame object, as current Siemens (XA) and Philips
software send it: a Legacy Converted Enhanced MR Image (highdicom converts the classic slices), or
an Enhanced MR Image made from that by moving the converted classic attributes into the Enhanced
MR's own macros (MR Timing and Related Parameters, MR Echo, MR Modifier, Spectrally Selected
Suppression). The second carries what the node reads of an Enhanced MR Image; it is not a
complete Enhanced MR IOD (no MR Image Frame Type or contrast/bolus macros)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import highdicom as hd
import pydicom
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomnode.frames import ENHANCED_MR

MR_FORMATS = ("classic", "legacy-enhanced", "enhanced")


def multiframe_mr(classic: Sequence[Dataset], fmt: str) -> Dataset:
    """One multi-frame instance holding the classic slices as frames, in their order."""
    if fmt not in MR_FORMATS[1:]:
        raise ValueError(f"format must be one of {MR_FORMATS[1:]}")
    first = classic[0]
    uid = generate_uid(entropy_srcs=["phantom/multiframe", str(first.SeriesInstanceUID), fmt])
    image = hd.legacy.LegacyConvertedEnhancedMRImage(
        list(classic), series_instance_uid=str(first.SeriesInstanceUID), series_number=int(first.SeriesNumber),
        sop_instance_uid=uid, instance_number=1, transfer_syntax_uid=ExplicitVRLittleEndian)
    if fmt == "legacy-enhanced":
        return image
    shared = image.SharedFunctionalGroupsSequence[0]
    converted = shared.get("UnassignedSharedConvertedAttributesSequence", [Dataset()])[0]
    timing, echo, modifier = Dataset(), Dataset(), Dataset()
    timing.RepetitionTime = float(first.RepetitionTime)
    timing.FlipAngle = float(first.FlipAngle)
    timing.EchoTrainLength = int(first.EchoTrainLength)
    echo.EffectiveEchoTime = float(first.EchoTime)
    inversion = "InversionTime" in first
    modifier.InversionRecovery = "YES" if inversion else "NO"
    if inversion:
        modifier.InversionTimes = [float(first.InversionTime)]
    modifier.FlowCompensation, modifier.SpatialPresaturation = "NONE", "NONE"
    shared.MRTimingAndRelatedParametersSequence = [timing]
    shared.MREchoSequence = [echo]
    shared.MRModifierSequence = [modifier]
    for item in (shared, *image.PerFrameFunctionalGroupsSequence):
        for keyword in ("UnassignedSharedConvertedAttributesSequence", "UnassignedPerFrameConvertedAttributesSequence"):
            if keyword in item:
                delattr(item, keyword)
    options = {str(o).upper() for o in (converted.get("ScanOptions") or [])} if converted.get("ScanOptions") else set()
    fat = bool(options & {"FS", "SFS", "FAT_SAT", "SP", "SPAIR", "SPIR", "CHESS"})
    image.SpectrallySelectedSuppression = "FAT" if fat else "NONE"
    image.PulseSequenceName = str(first.get("SequenceName", "") or "TSE")[:16]
    image.SOPClassUID = ENHANCED_MR
    image.file_meta.MediaStorageSOPClassUID = ENHANCED_MR
    return image


def write_multiframe(paths: Sequence[Path], fmt: str) -> list[Path]:
    """Replace the classic MR files with one multi-frame file beside them; return its path."""
    classic = [pydicom.dcmread(p) for p in paths]
    image = multiframe_mr(classic, fmt)
    out = Path(paths[0]).parent / f"{fmt}.dcm"
    image.save_as(out, enforce_file_format=True)
    for p in paths:
        Path(p).unlink()
    return [out]
