"""Small, fast DICOM series for the node tests (the phantom generator makes the realistic ones)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

VENDORS = {
    # (Manufacturer, SeriesDescription, ScanOptions, SequenceName)
    "siemens": ("SIEMENS", "t2_tse_fs_sag", "FS", "*tse2d1_17"),
    "ge": ("GE MEDICAL SYSTEMS", "Sag T2 FSE FS", "FAST_GEMS\\FS", "fse-xl"),
    "ge_fatsat": ("GE MEDICAL SYSTEMS", "SAG T2 FatSat", "FAST_GEMS\\FC", "fse"),
    "philips": ("Philips", "T2W_TSE_SPAIR", "", "TSE"),
    "philips_spir": ("Philips", "sT2W_TSE SPIR SAG", "", "TSE"),
}

ORIENTATIONS = {
    "sagittal": ([0.0, 1.0, 0.0, 0.0, 0.0, -1.0], np.array([1.0, 0.0, 0.0])),
    "axial": ([1.0, 0.0, 0.0, 0.0, 1.0, 0.0], np.array([0.0, 0.0, 1.0])),
    "coronal": ([1.0, 0.0, 0.0, 0.0, 0.0, -1.0], np.array([0.0, 1.0, 0.0])),
}


def make_series(out_dir: Path, *, vendor: str = "siemens", orientation: str = "sagittal", modality: str = "MR",
                description: str | None = None, te: float = 90.0, tr: float = 3500.0, slices: int = 12,
                rows: int = 32, cols: int = 24, declare_size: bool = True, study_uid: str | None = None,
                patient_name: str = "TEST^PATIENT", charset: str = "ISO_IR 100", seed: int = 0) -> list[Path]:
    """Write a tiny uncompressed series; return the file paths in slice order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    manufacturer, desc, options, seq = VENDORS[vendor]
    iop, normal = ORIENTATIONS[orientation]
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    frame_uid = generate_uid()
    sop_class = MRImageStorage if modality == "MR" else CTImageStorage
    paths = []
    for k in range(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = charset
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality = modality
        ds.Manufacturer = manufacturer
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, "PID0001", "19600101", "F"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName = "20260101", "101010", "ACC1", ""
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 3, k + 1
        ds.SeriesDescription = description if description is not None else desc
        ds.BodyPartExamined = "SPINE"
        if modality == "MR":
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "SK", options
            ds.MRAcquisitionType, ds.SequenceName = "2D", seq
            ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength = te, tr, 17
            ds.SliceThickness, ds.MagneticFieldStrength = 3.0, 1.5
        else:
            ds.KVP, ds.SliceThickness = 120, 3.0
        if declare_size:
            ds.ImagesInAcquisition = slices
        ds.ImageOrientationPatient = iop
        pos = np.array([-20.0, -100.0, 120.0]) + normal * 3.3 * (k - slices / 2)
        ds.ImagePositionPatient = [round(float(v), 3) for v in pos]
        ds.PixelSpacing = [0.9, 0.9]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = rng.integers(0, 4096, size=(rows, cols), dtype=np.uint16).tobytes()
        path = out_dir / f"{series_uid[-12:]}_{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
