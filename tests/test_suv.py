"""QIBA SUVbw against values computed by hand, and every header it must refuse, with the tag named.

Hand computation (half-life 6000 s so that the decay factors are powers of two):
- START, dose 400 MBq, uptake 6000 s: decayed dose 200 MBq; weight 80 kg: 80000 g / 200e6 Bq
  = 4e-4 per Bq/ml. Stored 1000 x slope 2.5 = 2500 Bq/ml -> SUV 1.0.
- ADMIN: the dose is not decayed: 80000 / 400e6 = 2e-4 -> SUV 0.5.
- START, weight 60 kg, uptake 3000 s: decayed 400e6 / sqrt(2) = 282842712.5 Bq;
  60000 * 2500 / 282842712.5 = 0.5303301 SUV.
- Per-slice slope 5.0 on the START case: 1000 x 5.0 = 5000 Bq/ml -> SUV 2.0.
- Injection 23:20 on the day before a 01:00 scan, given as a DateTime: uptake 6000 s -> SUV 1.0.
- A post-processed series (Series Time 12:00 after Acquisition Time 11:00) with GE's scan time
  11:00 and injection 09:20: uptake 6000 s -> SUV 1.0.
- GML: already SUV: 1000 x slope 0.0025 = 2.5. CNTS with Philips' SUV scale factor 1e-4: 2500 x 1e-4 = 0.25.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicomnode.tools.suv import SuvError, series_scale, suv_from_pet


def pet(**over) -> Dataset:
    ds = Dataset()
    ds.Units, ds.CorrectedImage, ds.DecayCorrection = "BQML", ["ATTN", "DECY", "SCAT"], "START"
    ds.PatientWeight = "80"
    ds.SeriesDate, ds.SeriesTime = "20200101", "110000"
    ds.AcquisitionDate, ds.AcquisitionTime = "20200101", "110000"
    radio = Dataset()
    radio.RadionuclideTotalDose, radio.RadionuclideHalfLife = "400000000", "6000"
    radio.RadiopharmaceuticalStartTime = "092000"
    ds.RadiopharmaceuticalInformationSequence = Sequence([radio])
    ds.RescaleSlope, ds.RescaleIntercept = "2.5", "0"
    ds.Rows = ds.Columns = 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = np.array([[1000]], "<i2").tobytes()
    radio_over = over.pop("radio", {})
    for key, value in over.items():
        if value is None:
            delattr(ds, key) if key in ds else None
        else:
            setattr(ds, key, value)
    for key, value in radio_over.items():
        if value is None:
            delattr(radio, key)
        else:
            setattr(radio, key, value)
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    return ds


def _ge(ds: Dataset, when: str) -> Dataset:
    ds.private_block(0x0009, "GEMS_PETD_01", create=True).add_new(0x0D, "DT", when)
    return ds


def _philips(ds: Dataset, factor: float) -> Dataset:
    ds.private_block(0x7053, "Philips PET Private Group", create=True).add_new(0x00, "DS", f"{factor}")
    return ds


@pytest.mark.parametrize("case, ds, suv", [
    ("START", pet(), 1.0),
    ("ADMIN", pet(DecayCorrection="ADMIN"), 0.5),
    ("START, 60 kg, uptake 3000 s", pet(PatientWeight="60", radio={"RadiopharmaceuticalStartTime": "101000"}), 0.5303301),
    ("slope 5.0 on this slice", pet(RescaleSlope="5.0"), 2.0),
    ("start DateTime the day before", pet(SeriesDate="20200102", SeriesTime="010000", AcquisitionDate="20200102",
                                          AcquisitionTime="010000",
                                          radio={"RadiopharmaceuticalStartDateTime": "20200101232000"}), 1.0),
    ("post-processed, GE scan time", _ge(pet(SeriesTime="120000"), "20200101110000"), 1.0),
    ("GML", pet(Units="GML", RescaleSlope="0.0025"), 2.5),
    ("CNTS, Philips SUV factor", _philips(pet(Units="CNTS"), 1e-4), 0.25),
])
def test_suv_matches_hand_computed_values(case, ds, suv):
    assert float(suv_from_pet(ds)[0, 0]) == pytest.approx(suv, rel=1e-6), case


@pytest.mark.parametrize("ds, tag", [
    (pet(CorrectedImage=["DECY"]), "CorrectedImage (0028,0051) lacks ATTN"),
    (pet(CorrectedImage=["ATTN"]), "CorrectedImage (0028,0051) lacks DECY"),
    (pet(DecayCorrection="NONE"), "DecayCorrection (0054,1102)"),
    (pet(Units="CNTS"), "(7053,1000)"),
    (pet(Units="PROPCPS"), "Units (0054,1001)"),
    (pet(PatientWeight=None), "PatientWeight (0010,1030) is missing"),
    (pet(PatientWeight="0"), "PatientWeight (0010,1030)"),
    (pet(radio={"RadionuclideTotalDose": None}), "RadionuclideTotalDose (0018,1074)"),
    (pet(radio={"RadionuclideHalfLife": None}), "RadionuclideHalfLife (0018,1075)"),
    (pet(RadiopharmaceuticalInformationSequence=Sequence([])), "(0054,0016)"),
    (pet(radio={"RadiopharmaceuticalStartTime": "233000"}), "RadiopharmaceuticalStartTime (0018,1072)"),
    (pet(radio={"RadiopharmaceuticalStartDateTime": "20200101120000"}), "(0018,1078) is not before"),
    (pet(radio={"RadiopharmaceuticalStartDateTime": "20191231100000"}), "uptake time"),
    (pet(radio={"RadiopharmaceuticalStartTime": None}), "(0018,1072) missing"),
    (pet(SeriesTime="120000"), "(0009,100D)"),
    (pet(SeriesDate=None), "SeriesDate (0008,0021)"),
])
def test_headers_without_what_suv_needs_are_refused_naming_the_tag(ds, tag):
    with pytest.raises(SuvError) as info:
        suv_from_pet(ds)
    assert tag in str(info.value)


def test_a_series_must_agree_on_its_scale_but_may_vary_the_slope():
    a, b = pet(), pet(RescaleSlope="5.0")
    assert series_scale([a, b]).factor == pytest.approx(4e-4)
    c = copy.deepcopy(a)
    c.PatientWeight = "81"
    with pytest.raises(SuvError, match="PatientWeight: inconsistent slices"):
        series_scale([a, c])
