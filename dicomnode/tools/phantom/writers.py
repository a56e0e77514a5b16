"""DICOM encoding of one phantom study: MR Image, PET Image and RGB Secondary Capture objects.

Attributes follow what the scanners and a reading workstation export (vendor-like naming per
`VENDORS`); every object is meant to pass dciodvfy without errors (tests/test_phantom.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    MRImageStorage,
    PositronEmissionTomographyImageStorage,
    SecondaryCaptureImageStorage,
)

from dicomnode.tools.phantom.uptake import F18_HALF_LIFE_S

_PLANE = {"sagittal": ("sag", "Sag", ""), "axial": ("tra", "Ax", "_TRA"), "coronal": ("cor", "Cor", "_COR")}

VENDORS: dict[str, dict[str, Any]] = {
    "siemens": {
        "Manufacturer": "SIEMENS", "ManufacturerModelName": "Biograph_mMR", "SoftwareVersions": "syngo MR E11",
        "StationName": "MRC40512", "InstitutionName": "Phantom University Hospital",
        "desc": {"T2FS": ["t2_tse_fs_{p}"], "T1": ["t1_tse_{p}"], "STIR": ["t2_tirm_{p}"]},
        "options": {"T2FS": ["FS"], "T1": [], "STIR": ["IR"]},
        "SequenceName": "*tse2d1_17", "ImagingFrequency": 123.2, "thickness": (3.0, 4.0),
        "image_type": ["ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D"],
        "pet_desc": "PET_AC_{p}", "fusion_desc": "Fused PET-MR {d}",
        "pet": {"matrix": 172, "pixel": 2.0863, "thickness": 2.03},
    },
    "ge": {
        "Manufacturer": "GE MEDICAL SYSTEMS", "ManufacturerModelName": "SIGNA PET/MR", "SoftwareVersions": "MR29.1",
        "StationName": "GEPETMR01", "InstitutionName": "Phantom University Hospital",
        "desc": {"T2FS": ["{P} T2 FSE FS", "{P} T2 FatSat"], "T1": ["{P} T1 FSE"], "STIR": ["{P} STIR"]},
        "options": {"T2FS": ["FAST_GEMS", "FS"], "T1": ["FAST_GEMS"], "STIR": ["FAST_GEMS", "IR"]},
        "SequenceName": "fse-xl", "ImagingFrequency": 127.8, "thickness": (4.0, 4.0),
        "image_type": ["ORIGINAL", "PRIMARY", "OTHER"],
        "pet_desc": "PET MRAC {P}", "fusion_desc": "PET/MR Fusion {P}",
        "pet": {"matrix": 192, "pixel": 3.125, "thickness": 2.78},
    },
    "philips": {
        "Manufacturer": "Philips", "ManufacturerModelName": "Ingenuity TF PET/MR", "SoftwareVersions": "5.7.1",
        "StationName": "PMR-1", "InstitutionName": "Phantom University Hospital",
        "desc": {"T2FS": ["T2W_TSE_SPAIR{s}", "T2W_TSE_SPIR{s}"], "T1": ["T1W_TSE{s}"], "STIR": ["STIR_TSE{s}"]},
        "options": {"T2FS": ["FS"], "T1": [], "STIR": ["IR"]},
        "SequenceName": "TSE", "ImagingFrequency": 127.7, "thickness": (3.5, 3.5),
        "image_type": ["ORIGINAL", "PRIMARY", "M_SE", "M", "SE"],
        "pet_desc": "PET {P} MRAC", "fusion_desc": "Fusion {d}",
        "pet": {"matrix": 144, "pixel": 4.0, "thickness": 4.0},
    },
}

_CODE_F18 = ("77004003", "SCT", "^18^Fluorine")
_CODE_FDG = ("35321007", "SCT", "Fluorodeoxyglucose F^18^")


def series_description(vendor: str, weighting: str, orientation: str, variant: int = 0) -> str:
    p, P, s = _PLANE[orientation]
    choices = VENDORS[vendor]["desc"][weighting]
    return choices[variant % len(choices)].format(p=p, P=P, s=s)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def _ds(sop_class: str, sop_uid: str, case: dict) -> Dataset:
    """Patient, study, equipment and SOP common attributes shared by every object of a case."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if case.get("charset"):
        ds.SpecificCharacterSet = case["charset"]
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = case["study_date"], case["series_time"]
    ds.PatientName = case["patient_name"]
    ds.PatientID = case["patient_id"]
    ds.IssuerOfPatientID = "PHANTOM"
    ds.PatientBirthDate = case["birth_date"]
    ds.PatientSex = case["sex"]
    ds.PatientAge = case["age"]
    ds.PatientWeight = f"{case['weight']:.1f}"
    ds.PatientSize = f"{case['height']:.2f}"
    ds.StudyInstanceUID = case["study_uid"]
    ds.StudyDate, ds.StudyTime = case["study_date"], case["study_time"]
    ds.AccessionNumber = case["accession"]
    ds.StudyID = case["study_id"]
    ds.ReferringPhysicianName = case["referring"]
    ds.StudyDescription = "PET-MR^Wirbelsaeule"
    v = VENDORS[case["vendor"]]
    for key in ("Manufacturer", "ManufacturerModelName", "SoftwareVersions", "StationName", "InstitutionName"):
        setattr(ds, key, v[key])
    ds.DeviceSerialNumber = "40512"
    return ds


def _series(ds: Dataset, case: dict, modality: str, uid: str, number: int, desc: str) -> None:
    ds.Modality = modality
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = uid, number, desc
    ds.SeriesDate, ds.SeriesTime = case["study_date"], case["series_time"]
    ds.BodyPartExamined = "SPINE"
    ds.PatientPosition = "HFS"


def _plane(ds: Dataset, grid, pos: np.ndarray, frame_uid: str) -> None:
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in grid.iop]
    ds.PixelSpacing = [f"{grid.row_spacing:.6f}", f"{grid.col_spacing:.6f}"]
    ds.SliceThickness = f"{grid.thickness:.2f}"
    ds.SliceLocation = f"{float(np.dot(pos, grid.normal)):.4f}"


def _pixels(ds: Dataset, arr: np.ndarray, bits_stored: int, signed: bool = False) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = arr.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = np.ascontiguousarray(arr.astype("<i2" if signed else "<u2")).tobytes()


def _save(ds: Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_mr(case: dict, grid, volume: np.ndarray, out: Path, window: tuple[float, float]) -> list[Path]:
    """MR Image Storage, one file per slice, 12 bits stored."""
    v, w = VENDORS[case["vendor"]], case["weighting"]
    paths = []
    for k, pos in enumerate(grid.positions()):
        ds = _ds(MRImageStorage, case["mr_sop_uids"][k], case)
        _series(ds, case, "MR", case["mr_series_uid"], case["mr_series_number"], case["series_description"])
        ds.ProtocolName = case["series_description"]
        _plane(ds, grid, pos, case["frame_uid"])
        ds.ImageType = v["image_type"]
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        ds.ContentDate, ds.ContentTime = case["study_date"], case["series_time"]
        ds.AcquisitionDate, ds.AcquisitionTime = case["study_date"], case["series_time"]
        ds.ScanningSequence = ["SE", "IR"] if w == "STIR" else "SE"
        ds.SequenceVariant = ["SK", "SP", "OSP"]
        ds.ScanOptions = v["options"][w] or ""
        ds.MRAcquisitionType = "2D"
        ds.SequenceName = v["SequenceName"]
        ds.RepetitionTime = {"T2FS": "3800", "T1": "600", "STIR": "4200"}[w]
        ds.EchoTime = {"T2FS": "89", "T1": "11", "STIR": "62"}[w]
        if w == "STIR":
            ds.InversionTime = "220"
        ds.EchoTrainLength = {"T2FS": 17, "T1": 4, "STIR": 15}[w]
        ds.NumberOfAverages = "2"
        ds.ImagingFrequency = f"{v['ImagingFrequency']:.4f}"
        ds.ImagedNucleus = "1H"
        ds.EchoNumbers = 1
        ds.MagneticFieldStrength = "3"
        ds.SpacingBetweenSlices = f"{grid.slice_spacing:.2f}"
        ds.NumberOfPhaseEncodingSteps = int(grid.rows * 0.8)
        ds.PercentSampling = "100"
        ds.PercentPhaseFieldOfView = f"{100.0 * grid.cols * grid.col_spacing / (grid.rows * grid.row_spacing):.1f}"
        ds.PixelBandwidth = "250"
        ds.ReceiveCoilName = "Spine"
        ds.TransmitCoilName = "Body"
        ds.AcquisitionMatrix = [0, grid.cols, int(grid.rows * 0.8), 0]
        ds.InPlanePhaseEncodingDirection = "COL"
        ds.FlipAngle = "150" if w != "T1" else "90"
        ds.ImagesInAcquisition = grid.slices
        ds.PatientOrientation = ""
        _pixels(ds, volume[k], 12)
        ds.WindowCenter, ds.WindowWidth = f"{window[0]:.0f}", f"{window[1]:.0f}"
        path = out / f"{k + 1:03d}.dcm"
        _save(ds, path)
        paths.append(path)
    return paths


def quantise_pet(suv: np.ndarray, bqml_per_suv: float) -> tuple[np.ndarray, str]:
    """One slice of SUV -> (int16 stored values in Bq/ml, Rescale Slope as written to the header)."""
    bq = suv.astype(np.float64) * bqml_per_suv
    slope = f"{max(float(bq.max()) / 32000.0, 1e-3):.8g}"
    return np.rint(bq / float(slope)).astype(np.int16), slope


def stored_suv(suv: np.ndarray, bqml_per_suv: float) -> np.ndarray:
    """The SUV volume exactly as `write_pet` would store it (after quantisation)."""
    out = np.empty_like(suv)
    for k in range(suv.shape[0]):
        stored, slope = quantise_pet(suv[k], bqml_per_suv)
        out[k] = stored.astype(np.float64) * float(slope) / bqml_per_suv
    return out


def write_pet(case: dict, grid, suv: np.ndarray, out: Path, *, on_mr_grid: bool = False) -> list[Path]:
    """PET Image Storage, Units BQML, decay corrected to the series start, per-slice Rescale Slope.

    A scanner's series (`grid` axial, its own matrix and spacing) is ORIGINAL; `on_mr_grid` marks
    a series resampled onto the MR slices as DERIVED."""
    per_suv = case["bqml_per_suv"]
    paths = []
    inj = case["injection_time"]
    radio = Dataset()
    radio.Radiopharmaceutical = "Fluorodeoxyglucose"
    radio.RadiopharmaceuticalStartTime = inj
    radio.RadiopharmaceuticalStartDateTime = case["study_date"] + inj
    radio.RadionuclideTotalDose = f"{case['dose_bq']:.0f}"
    radio.RadionuclideHalfLife = f"{F18_HALF_LIFE_S}"
    radio.RadionuclidePositronFraction = "0.9673"
    radio.RadionuclideCodeSequence = Sequence([_code(*_CODE_F18)])
    radio.RadiopharmaceuticalCodeSequence = Sequence([_code(*_CODE_FDG)])
    for k, pos in enumerate(grid.positions()):
        stored, slope = quantise_pet(suv[k], per_suv)
        ds = _ds(PositronEmissionTomographyImageStorage, case["pet_sop_uids"][k], case)
        _series(ds, case, "PT", case["pet_series_uid"], case["pet_series_number"], case["pet_description"])
        del ds.PatientPosition  # PET carries the patient position in its code sequences instead
        _plane(ds, grid, pos, case["frame_uid"])
        if on_mr_grid:
            ds.ImageType = ["DERIVED", "PRIMARY"]
            ds.DerivationDescription = "PET resampled to the MR slice grid"
        else:
            ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.InstanceNumber = k + 1
        ds.ContentDate, ds.ContentTime = case["study_date"], case["series_time"]
        ds.AcquisitionDate, ds.AcquisitionTime = case["study_date"], case["series_time"]
        ds.Units = "BQML"
        ds.CountsSource = "EMISSION"
        ds.SeriesType = ["STATIC", "IMAGE"]
        ds.NumberOfSlices = grid.slices
        ds.CorrectedImage = ["NORM", "DTIM", "ATTN", "SCAT", "DECY", "RAN"]
        ds.DecayCorrection = "START"
        ds.RandomsCorrectionMethod = "DLYD"
        ds.AttenuationCorrectionMethod = "MR-based (Dixon)"
        ds.ReconstructionMethod = "OSEM 3i21s"
        ds.CollimatorType = "NONE"
        ds.RadiopharmaceuticalInformationSequence = Sequence([radio])
        orient = _code("102538003", "SCT", "recumbent")
        orient.PatientOrientationModifierCodeSequence = Sequence([_code("40199007", "SCT", "supine")])
        ds.PatientOrientationCodeSequence = Sequence([orient])
        ds.PatientGantryRelationshipCodeSequence = Sequence([_code("102540008", "SCT", "headfirst")])
        ds.FrameReferenceTime = "0"
        ds.ImageIndex = k + 1
        ds.ActualFrameDuration = 900000
        ds.DecayFactor = "1.0"
        ds.DoseCalibrationFactor = "1.0"
        ds.SliceSensitivityFactor = "1.0"
        ds.RescaleIntercept, ds.RescaleSlope = "0", slope
        _pixels(ds, stored, 16, signed=True)
        path = out / f"{k + 1:03d}.dcm"
        _save(ds, path)
        paths.append(path)
    return paths


def write_fusion(case: dict, grid, rgb: np.ndarray, out: Path) -> list[Path]:
    """RGB Secondary Capture per MR slice, same study, referencing its MR and PET slice."""
    from dicomnode.tools.phantom.grid import PATIENT_ORIENTATION

    paths = []
    for k in range(grid.slices):
        ds = _ds(SecondaryCaptureImageStorage, case["fusion_sop_uids"][k], case)
        _series(ds, case, "OT", case["fusion_series_uid"], case["fusion_series_number"], case["fusion_description"])
        del ds.PatientPosition
        ds.ConversionType = "WSD"
        ds.SecondaryCaptureDeviceManufacturer = "dicomnode phantom"
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.DerivationDescription = "PET/T2FS fusion, hot colour map SUV 0-7, opacity 0.5"
        ds.InstanceNumber = k + 1
        ds.ContentDate, ds.ContentTime = case["study_date"], case["series_time"]
        ds.PatientOrientation = list(PATIENT_ORIENTATION[grid.orientation])
        ds.BurnedInAnnotation = "NO"
        ds.PixelSpacing = [f"{grid.row_spacing:.6f}", f"{grid.col_spacing:.6f}"]
        mr_ref = Dataset()
        mr_ref.ReferencedSOPClassUID, mr_ref.ReferencedSOPInstanceUID = MRImageStorage, case["mr_sop_uids"][k]
        ds.ReferencedImageSequence = Sequence([mr_ref])
        srcs = []
        sources = [(MRImageStorage, case["mr_sop_uids"][k])]
        if case["pet_on_mr_grid"]:  # a scanner's axial PET has no one slice this image came from
            sources.append((PositronEmissionTomographyImageStorage, case["pet_sop_uids"][k]))
        for cls, uid in sources:
            src = Dataset()
            src.ReferencedSOPClassUID, src.ReferencedSOPInstanceUID = cls, uid
            src.PurposeOfReferenceCodeSequence = Sequence([_code("121322", "DCM",
                                                                 "Source image for image processing operation")])
            srcs.append(src)
        ds.SourceImageSequence = Sequence(srcs)
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        ds.Rows, ds.Columns = rgb.shape[1:3]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = np.ascontiguousarray(rgb[k], dtype=np.uint8).tobytes()
        path = out / f"{k + 1:03d}.dcm"
        _save(ds, path)
        paths.append(path)
    return paths


def uid(*parts: Any) -> str:
    """Deterministic UID in the 2.25 (UUID-derived integer) form from the seed and a path of names."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()[:16]
    return f"2.25.{int.from_bytes(digest, 'big')}"
