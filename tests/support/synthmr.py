"""Tiny sagittal MR series for tests of preprocessing and encoding (no phantom dependency)."""

from __future__ import annotations

import math

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid


def sagittal_iop(tilt_deg: float = 0.0) -> list[float]:
    """Row cosine anterior->posterior, column cosine head->feet, tilted about the L-R axis."""
    t = math.radians(tilt_deg)
    row = [0.0, math.cos(t), math.sin(t)]
    col = [0.0, math.sin(t), -math.cos(t)]
    return [round(v, 6) for v in row + col]


def make_series(n_slices: int = 4, rows: int = 64, cols: int = 48, *, tilt_deg: float = 0.0,
                spacing: tuple[float, float] = (0.8, 0.8), slice_gap: float = 4.0,
                charset: str | list[str] | None = "ISO_IR 100", patient_name: str = "Müller^Jürgen",
                seed: int = 0) -> list[Dataset]:
    """Return `n_slices` MR datasets, Instance Number following slice order (left to right)."""
    rng = np.random.default_rng(seed)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    iop = sagittal_iop(tilt_deg)
    normal = np.cross(iop[:3], iop[3:])
    origin = np.array([-8.0, -20.0, 30.0])
    yy, xx = np.mgrid[0:rows, 0:cols]
    out = []
    for k in range(n_slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        sop = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        if charset is not None:
            ds.SpecificCharacterSet = charset
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop
        ds.PatientName, ds.PatientID = patient_name, "PID0001"
        ds.PatientBirthDate, ds.PatientSex = "19700101", "M"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "101010", "S1", "ACC1"
        ds.ReferringPhysicianName, ds.StudyDescription = "", "MR LWS"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 7, k + 1
        ds.SeriesDescription, ds.BodyPartExamined = "T2 TSE SAG FS", "LSPINE"
        ds.Manufacturer, ds.ManufacturerModelName = "ACME", "Magnet 3T"
        ds.PositionReferenceIndicator = "IC"
        ds.ImageOrientationPatient = iop
        ds.ImagePositionPatient = [round(float(v), 4) for v in origin + k * slice_gap * normal]
        ds.PixelSpacing = list(spacing)
        ds.SliceThickness = slice_gap
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        # A blob whose centre moves with the slice so ordering mistakes show up in the pixels.
        img = 200 + 3000 * np.exp(-(((yy - rows / 2) / 10.0) ** 2 + ((xx - 8 - 8 * k) / 6.0) ** 2))
        img += rng.normal(0, 20, img.shape)
        ds.PixelData = np.clip(img, 0, 4095).astype(np.uint16).tobytes()
        out.append(ds)
    return out
