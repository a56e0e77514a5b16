"""Body-weight SUV of PET images by the QIBA FDG-PET/CT profile's vendor-neutral rules.

QIBA (Appendix G) defines SUVbw from the header alone; no library implements it with refusals,
so it is written here, with a table of hand-computed values in tests/test_suv.py:

- Corrected Image (0028,0051) must list ATTN and DECY; Decay Correction (0054,1102) START or ADMIN.
- Units (0054,1001) BQML: SUVbw = Bq/ml * weight_g / decayed dose. With START the dose decays from
  the injection to the scan start: the Series Date/Time when it is not after the earliest
  Acquisition Date/Time; otherwise (a post-processed series) GE's private scan date/time
  (0009,100D in group GEMS_PETD_01). With ADMIN the images are corrected to the injection and the
  dose is not decayed.
- Units CNTS: Philips' private SUV Scale Factor (7053,1000), or its Activity Concentration Scale
  Factor (7053,1009) which scales to Bq/ml. Units GML: already SUVbw.
- The injection is Radiopharmaceutical Start DateTime (0018,1078), or Radiopharmaceutical Start
  Time (0018,1072) on the Series Date. With a time only, a start after the scan could be a
  midnight crossing or a wrong clock: refused, never guessed.
- Stored value * Rescale Slope + Rescale Intercept, per slice (GE varies the slope by slice).

Anything missing or implausible raises `SuvError` with a reason that names the tag.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Sequence

import numpy as np
from pydicom.dataset import Dataset

MAX_UPTAKE = timedelta(hours=12)  # beyond this the times are wrong, not the patient


class SuvError(ValueError):
    """The header does not allow SUVbw; the message names the tag."""


@dataclass(frozen=True)
class SuvScale:
    """SUVbw per rescaled pixel unit, and how it was derived (for the manifest)."""

    factor: float
    units: str
    decay_correction: str
    uptake_s: float | None  # injection to scan start (None where the rule does not need it)


def _dt(date: str, time: str) -> datetime | None:
    date, time = str(date or "").strip(), str(time or "").strip()
    if len(date) != 8 or not date.isdigit() or len(time) < 2:
        return None
    whole, _, frac = time.partition(".")
    whole = whole.ljust(6, "0")
    try:
        out = datetime.strptime(date + whole[:6], "%Y%m%d%H%M%S")
    except ValueError:
        return None
    return out + timedelta(seconds=float("0." + frac) if frac.isdigit() else 0.0)


def _dt_value(value: str) -> datetime | None:
    """A DICOM DT (YYYYMMDDHHMMSS.FFFFFF, an offset ignored: both times come from one scanner)."""
    text = str(value or "").strip()
    for sign in "+-":
        if sign in text[8:]:
            text = text[: 8 + text[8:].index(sign)]
    return _dt(text[:8], text[8:]) if len(text) >= 10 else None


def _positive(ds: Dataset, keyword: str, tag: str) -> float:
    value = ds.get(keyword)
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise SuvError(f"{keyword} {tag} is missing") from None
    if not np.isfinite(out) or out <= 0:
        raise SuvError(f"{keyword} {tag} is {value!r}, not a positive number")
    return out


def _private(ds: Dataset, group: int, creator: str, element: int) -> float | None:
    try:
        block = ds.private_block(group, creator)
        return float(block[element].value)
    except (KeyError, ValueError, TypeError):
        return None


def suv_scale(ds: Dataset, earliest_acquisition: datetime | None = None) -> SuvScale:
    """SUVbw per Bq/ml (or per count) of one PET image; `earliest_acquisition` is the series'
    earliest Acquisition Date/Time when the caller has the whole series (else this image's)."""
    units = str(ds.get("Units", "")).upper()
    value = ds.get("CorrectedImage") or []
    corrected = {str(v).upper() for v in ([value] if isinstance(value, str) else value)}
    if not {"ATTN", "DECY"} <= corrected:
        missing = "/".join(sorted({"ATTN", "DECY"} - corrected))
        raise SuvError(f"CorrectedImage (0028,0051) lacks {missing}: not attenuation and decay corrected")
    decay = str(ds.get("DecayCorrection", "")).upper()
    if decay not in ("START", "ADMIN"):
        raise SuvError(f"DecayCorrection (0054,1102) is {decay or 'missing'!r} (START or ADMIN)")
    if units == "GML":
        return SuvScale(1.0, units, decay, None)
    weight_g = _positive(ds, "PatientWeight", "(0010,1030)") * 1000.0
    if units == "CNTS":
        philips = _private(ds, 0x7053, "Philips PET Private Group", 0x00)
        if philips is not None and philips > 0:
            return SuvScale(philips, units, decay, None)
        activity = _private(ds, 0x7053, "Philips PET Private Group", 0x09)
        if activity is None or activity <= 0:
            raise SuvError("Units (0054,1001) CNTS without Philips SUV Scale Factor (7053,1000) or "
                           "Activity Concentration Scale Factor (7053,1009)")
        bq = _bqml_scale(ds, decay, weight_g, earliest_acquisition)
        return SuvScale(activity * bq.factor, units, decay, bq.uptake_s)
    if units != "BQML":
        raise SuvError(f"Units (0054,1001) is {units or 'missing'!r} (BQML, CNTS or GML)")
    return _bqml_scale(ds, decay, weight_g, earliest_acquisition)


def _bqml_scale(ds: Dataset, decay: str, weight_g: float, earliest_acquisition: datetime | None) -> SuvScale:
    seq = ds.get("RadiopharmaceuticalInformationSequence") or []
    if len(seq) != 1:
        raise SuvError(f"RadiopharmaceuticalInformationSequence (0054,0016) has {len(seq)} items (want 1)")
    radio = seq[0]
    dose = _positive(radio, "RadionuclideTotalDose", "(0018,1074)")
    half_life = _positive(radio, "RadionuclideHalfLife", "(0018,1075)")
    if decay == "ADMIN":
        return SuvScale(weight_g / dose, "BQML", decay, None)
    series = _dt(ds.get("SeriesDate", ""), ds.get("SeriesTime", ""))
    if series is None:
        raise SuvError("SeriesDate (0008,0021) / SeriesTime (0008,0031) missing or malformed")
    acquired = earliest_acquisition or _dt(ds.get("AcquisitionDate", ""), ds.get("AcquisitionTime", ""))
    scan = series
    if acquired is not None and series > acquired:  # a post-processed series: its series time moved
        scan = _ge_scan_time(ds)
    start = _dt_value(radio.get("RadiopharmaceuticalStartDateTime", ""))
    if start is None:
        time = str(radio.get("RadiopharmaceuticalStartTime", "") or "")
        start = _dt(ds.get("SeriesDate", ""), time)
        if start is None:
            raise SuvError("RadiopharmaceuticalStartDateTime (0018,1078) and RadiopharmaceuticalStartTime "
                           "(0018,1072) missing or malformed")
        if start > scan:
            raise SuvError("RadiopharmaceuticalStartTime (0018,1072) is after the scan start on the same day "
                           "(a midnight crossing or a wrong clock; no start date to tell)")
    uptake = scan - start
    if uptake <= timedelta(0):
        raise SuvError("RadiopharmaceuticalStartDateTime (0018,1078) is not before the scan start")
    if uptake > MAX_UPTAKE:
        raise SuvError(f"uptake time {uptake} from RadiopharmaceuticalStart (0018,1078/1072) to the scan is "
                       f"longer than {MAX_UPTAKE}")
    decayed = dose * 2.0 ** (-uptake.total_seconds() / half_life)
    return SuvScale(weight_g / decayed, "BQML", decay, uptake.total_seconds())


def _ge_scan_time(ds: Dataset) -> datetime:
    try:
        value = ds.private_block(0x0009, "GEMS_PETD_01")[0x0D].value
    except KeyError:
        value = None
    scan = _dt_value(value) if value else None
    if scan is None:
        raise SuvError("SeriesTime (0008,0031) is after AcquisitionTime (0008,0032) (a post-processed series) "
                       "and GE's scan date/time (0009,100D) is absent")
    return scan


def series_scale(headers: Sequence[Dataset]) -> SuvScale:
    """One SUV scale for a whole PET series: every slice must agree on units, corrections,
    radiopharmaceutical and weight (per-slice Rescale Slope is allowed and applied by `suv_image`)."""
    if not headers:
        raise SuvError("no PET images")
    acquired = [a for ds in headers if (a := _dt(ds.get("AcquisitionDate", ""), ds.get("AcquisitionTime", "")))]
    earliest = min(acquired) if acquired else None
    scales = {suv_scale(ds, earliest) for ds in headers}
    if len({round(s.factor, 12) for s in scales}) > 1:
        keys = ("Units", "PatientWeight", "SeriesTime", "DecayCorrection")
        differing = [k for k in keys if len({str(ds.get(k, "")) for ds in headers}) > 1]
        differing = differing or ["RadiopharmaceuticalInformationSequence"]
        raise SuvError(f"PET slices disagree on {', '.join(differing)}: inconsistent slices")
    return next(iter(scales))


def suv_image(ds: Dataset, scale: SuvScale) -> np.ndarray:
    """SUVbw of one PET image (float32), its own Rescale Slope and Intercept applied."""
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    value = ds.pixel_array.astype(np.float64) * slope + intercept
    return (value * scale.factor).astype(np.float32)


def suv_from_pet(ds: Dataset) -> np.ndarray:
    """SUVbw of a single PET image by the rules above (raises `SuvError`)."""
    return suv_image(ds, suv_scale(ds))
