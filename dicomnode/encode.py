"""Encode synthetic PET/T2FS fusion slices as a derived Secondary Capture series (highdicom).

One single-frame RGB SC image per source slice, in the source study, in a new series whose UIDs
are derived from the source UIDs and the model version, so sending the same result twice is
idempotent at the PACS. Patient and study attributes are copied element by element (the person
name keeps its original bytes), so Latin-1, UTF-8 and ISO 2022 names survive unchanged.
No torch here: encoding needs only pydicom, highdicom, numpy and Pillow.
"""

from __future__ import annotations

import copy
import datetime
from typing import Sequence

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import PYDICOM_ROOT_UID, ExplicitVRLittleEndian, generate_uid

from dicomnode import __version__
from dicomnode.frames import frame_of

SERIES_DESCRIPTION = "SYNTHETIC PET/T2FS FUSION - NOT FOR DIAGNOSIS"
UNCERTAINTY_DESCRIPTION = "SYNTHETIC PET/T2FS UNCERTAINTY - NOT FOR DIAGNOSIS"
UNCERTAINTY_SERIES_OFFSET = 2000
BANNER_TEXT = "SYNTHETIC"
SERIES_NUMBER_OFFSET = 1000
ORIENTATION_MIN_COSINE = 0.01  # direction cosine components below this are not named

# Image Plane and Frame of Reference: copied from the source when the output keeps its grid. The
# Type 2 ones are written empty when the source lacks them, so the modules are complete.
GEOMETRY_TYPE1 = ("FrameOfReferenceUID", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
GEOMETRY_TYPE2 = ("PositionReferenceIndicator", "SliceThickness")


def series_uid(source_series_uid: str, model_name: str, model_version: str, variant: str = "",
               prefix: str = PYDICOM_ROOT_UID) -> str:
    """The synthetic series UID: a hash of the source series UID, the model and its version."""
    return generate_uid(prefix, ["dicomnode/series", source_series_uid, model_name, model_version, variant])


def instance_uid(source_sop_uid: str, model_name: str, model_version: str, variant: str = "",
                 prefix: str = PYDICOM_ROOT_UID) -> str:
    """The synthetic SOP Instance UID of the image derived from one source instance."""
    return generate_uid(prefix, ["dicomnode/instance", source_sop_uid, model_name, model_version, variant])


def patient_orientation(iop: Sequence[float]) -> tuple[str, str]:
    """Patient Orientation (row, column directions) from Image Orientation (Patient), e.g. ("PH", "FP")."""
    return _direction_letters(iop[:3]), _direction_letters(iop[3:])


def _direction_letters(cosines: Sequence[float]) -> str:
    letters = []
    for axis in np.argsort(-np.abs(np.asarray(cosines, dtype=float))):
        c = float(cosines[axis])
        if abs(c) >= ORIENTATION_MIN_COSINE:
            letters.append(("LR", "PA", "HF")[axis][0 if c > 0 else 1])
    return "".join(letters)


def burn_banner(rgb: np.ndarray, text: str = BANNER_TEXT, line: int = 0) -> np.ndarray:
    """Return a copy of `rgb` with `text` burned into the top-left corner, white on black
    (`line` 1 puts it below a line-0 banner of the same height).

    Uses PIL's built-in bitmap font scaled by an integer factor (about 6% of the image height),
    so the pixels are identical on every machine and no font file is needed.
    """
    img = np.array(rgb, dtype=np.uint8, copy=True)
    rows, cols = img.shape[:2]
    font = ImageFont.load_default_imagefont()
    left, top, right, bottom = font.getbbox(text)
    mask = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(mask).text((-left, -top), text, font=font, fill=255)
    margin = max(1, cols // 100)
    k = max(1, min(int(rows * 0.06) // mask.height, int(cols * 0.5) // mask.width))
    w, h = mask.width * k, mask.height * k
    if w > cols - 4 * margin:  # tiny image: shrink below the native bitmap size, keep it legible-ish
        w, h = cols - 4 * margin, max(3, round(mask.height * (cols - 4 * margin) / mask.width))
    glyphs = np.asarray(mask.resize((w, h), Image.Resampling.NEAREST if k > 1 else Image.Resampling.BOX)) >= 96
    y0, x0 = margin + line * (int(rows * 0.06) + 3 * margin), margin
    y1, x1 = min(rows, y0 + h + 2 * margin), min(cols, x0 + w + 2 * margin)
    img[y0:y1, x0:x1] = 0
    region = img[y0 + margin:y0 + margin + h, x0 + margin:x0 + margin + w]
    region[glyphs[:region.shape[0], :region.shape[1]]] = 255
    return img


# The uncertainty map's colour scale: SD in display levels of the 8-bit fusion image (0-255), with
# the same scale for every series so maps can be compared; SD_DISPLAY_MAX and above is the top colour.
SD_DISPLAY_MAX = 8.0
_SD_COLOURS = np.array([(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)], np.float32)


def uncertainty_image(sd_levels: np.ndarray, scale_max: float = SD_DISPLAY_MAX) -> np.ndarray:
    """(rows, cols) per-pixel SD in 8-bit display levels -> uint8 RGB colour map with a scale bar
    on the right edge (bottom 0, top `scale_max` and above), labelled in the same units."""
    sd = np.clip(np.nan_to_num(np.asarray(sd_levels, np.float32)) / scale_max, 0.0, 1.0)
    stops = np.linspace(0.0, 1.0, len(_SD_COLOURS))
    rgb = np.stack([np.interp(sd, stops, _SD_COLOURS[:, c]) for c in range(3)], -1)
    rows, cols = sd.shape
    width, margin = max(3, cols // 24), max(1, cols // 100)
    top, bottom = max(2, rows // 8), rows - max(2, rows // 16)
    ramp = np.linspace(1.0, 0.0, bottom - top)[:, None]
    bar = np.stack([np.interp(ramp, stops, _SD_COLOURS[:, c]) for c in range(3)], -1)
    x1 = cols - margin
    rgb[top:bottom, x1 - width:x1] = np.broadcast_to(bar, (bottom - top, width, 3))
    img = Image.fromarray(rgb.round().astype(np.uint8))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default_imagefont()
    for text, y in ((f"{scale_max:g}+", top), ("0", bottom)):
        left, t, right, b = font.getbbox(text)
        x, yy = max(0, x1 - width - (right - left) - 2 * margin), min(rows - (b - t) - 1, max(0, y - (b - t) // 2))
        draw.rectangle((x - 1, yy - 1, x + right - left + 1, yy + b - t + 1), fill=(0, 0, 0))
        draw.text((x - left, yy - t), text, font=font, fill=(255, 255, 255))
    return np.asarray(img)


def encode_series(sources: Sequence[Dataset], rgb_slices: Sequence[np.ndarray], *, model_name: str,
                  model_version: str, banner: bool = True, manufacturer: str = "dicomnode",
                  manufacturer_model_name: str = "dicomnode PET/T2FS synthesiser",
                  software_version: str = __version__, institution_name: str | None = None,
                  institutional_department_name: str | None = None, station_name: str | None = None,
                  series_number: int | None = None, series_description: str | None = None,
                  uid_prefix: str = PYDICOM_ROOT_UID, uid_variant: str = "", kind: str = "fusion",
                  warning: str | None = None) -> list[Dataset]:
    """Encode one RGB uint8 (H, W, 3) image per ordered source slice as a Secondary Capture series.

    `uid_variant` goes into the UID hash: pass a digest of anything besides the model version that
    changes the pixels (sampler settings, seed) so different pictures never share a UID. `kind` is
    "fusion" (the synthetic PET/T2FS fusion) or "uncertainty" (its K-sample SD map): a series of
    its own, with its own UIDs, description, series number and texts, marked synthetic the same way.
    `warning` (the safety gate's flag, e.g. "INPUT OUTSIDE TRAINING DATA") leads the series
    description, is burned in under the banner, ends the image comments and changes the UIDs.
    """
    if kind not in ("fusion", "uncertainty"):
        raise ValueError(f"kind must be 'fusion' or 'uncertainty', got {kind!r}")
    uncertainty = kind == "uncertainty"
    if series_description is None:
        series_description = UNCERTAINTY_DESCRIPTION if uncertainty else SERIES_DESCRIPTION
    if uncertainty:
        uid_variant = f"{uid_variant}/uncertainty"
    if warning:  # "SYNTHETIC" stays in the description whatever the warning's length
        series_description = f"{warning} - {'SYNTHETIC SD' if uncertainty else 'SYNTHETIC PET/T2FS'}"
        if len(series_description) > 64:
            series_description = f"{warning[:52]} - SYNTHETIC"
        uid_variant = f"{uid_variant}/{warning}"
    if len(sources) != len(rgb_slices) or not sources:
        raise ValueError(f"need one image per source slice, got {len(rgb_slices)} for {len(sources)}")
    _check_own_text(model_name=model_name, model_version=model_version, manufacturer=manufacturer,
                    manufacturer_model_name=manufacturer_model_name, software_version=software_version,
                    institution_name=institution_name, institutional_department_name=institutional_department_name,
                    station_name=station_name, series_description=series_description, uid_variant=uid_variant)
    first = sources[0]
    if any(s.StudyInstanceUID != first.StudyInstanceUID or s.SeriesInstanceUID != first.SeriesInstanceUID
           for s in sources):
        raise ValueError("sources must be one series")
    new_series = series_uid(first.SeriesInstanceUID, model_name, model_version, uid_variant, uid_prefix)
    if series_number is None:
        offset = UNCERTAINTY_SERIES_OFFSET if uncertainty else SERIES_NUMBER_OFFSET
        series_number = min(int(first.get("SeriesNumber") or 0) + offset, 2**31 - 1)
    now = datetime.datetime.now()
    equipment = hd.ContributingEquipment(
        manufacturer, codes.DCM.SynthesizingEquipment, manufacturer_model_name=manufacturer_model_name,
        software_versions=[software_version, f"{model_name} {model_version}"[:64]],
        institution_name=institution_name, institutional_department_name=institutional_department_name,
        station_name=station_name, contribution_description=f"Synthesis by {model_name} {model_version}"[:64])
    derivation = (f"Synthetic 18F-FDG PET/T2FS fusion generated from the T2 fat-saturated MR source image "
                  f"by {model_name} version {model_version} (Pix2Pix + conditional DDPM); not acquired PET")
    comments = f"SYNTHETIC image from {model_name} {model_version}. Not acquired PET; not for diagnosis."
    if uncertainty:
        derivation = ("Per-pixel standard deviation over the K samples of the synthetic PET/T2FS fusion generated "
                      f"from the T2 fat-saturated MR source image by {model_name} version {model_version}; "
                      "a map of the model's uncertainty, not acquired PET")
        comments = (f"SYNTHETIC uncertainty map (K-sample SD) from {model_name} {model_version}. "
                    "Not acquired PET; not for diagnosis.")
    if warning:
        comments += f" {warning}."
    out: list[Dataset] = []
    for number, (src, rgb) in enumerate(zip(sources, rgb_slices), start=1):
        rgb = np.asarray(rgb)
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"image {number}: expected uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
        if banner:
            rgb = burn_banner(rgb, "SYNTHETIC SD" if uncertainty else BANNER_TEXT)
            if warning:
                rgb = burn_banner(rgb, warning, line=1)
        out.append(SyntheticFusionImage(
            src, rgb,
            banner=banner, series_instance_uid=new_series,
            series_number=series_number, instance_number=number,
            sop_instance_uid=instance_uid(_source_key(src), model_name, model_version, uid_variant, uid_prefix),
            equipment=_equipment(src, equipment), derivation=derivation,
            comments=comments, manufacturer=manufacturer, series_description=series_description,
            manufacturer_model_name=manufacturer_model_name, software_versions=software_version,
            institution_name=institution_name, institutional_department_name=institutional_department_name,
            series_date=now.date(), series_time=now.time(), content_date=now.date(), content_time=now.time()))
    return out


class SyntheticFusionImage(hd.sc.SCImage):
    """One synthetic PET/T2FS fusion slice: an RGB Secondary Capture derived from one MR source slice.

    The constructor makes it what it is: in the source's study, with the source's patient and study
    attributes (highdicom's module tables; the character set and names byte for byte), on the
    source's grid when the pixels are, DERIVED\\SECONDARY with Conversion Type SYN and Synthetic
    Data YES, referencing its source slice, with the synthesiser as contributing equipment.
    """

    def __init__(self, source: Dataset, rgb: np.ndarray, *, banner: bool, series_instance_uid: str,
                 series_number: int, sop_instance_uid: str, instance_number: int,
                 equipment: Sequence[hd.ContributingEquipment], derivation: str, comments: str, manufacturer: str,
                 **kwargs):
        orient = _orientation(source)
        super().__init__(
            pixel_array=np.ascontiguousarray(rgb), photometric_interpretation="RGB", bits_allocated=8,
            coordinate_system="PATIENT", study_instance_uid=source.StudyInstanceUID,
            series_instance_uid=series_instance_uid, series_number=series_number, sop_instance_uid=sop_instance_uid,
            instance_number=instance_number, manufacturer=manufacturer,
            pixel_spacing=_pixel_spacing(source, rgb.shape[:2]), patient_orientation=(orient[0][0], orient[1][0]),
            transfer_syntax_uid=ExplicitVRLittleEndian, contributing_equipment=equipment, **kwargs)
        self.copy_patient_and_study_information(source)
        if "SpecificCharacterSet" in source:
            self.SpecificCharacterSet = copy.deepcopy(source.SpecificCharacterSet)
        elif "SpecificCharacterSet" in self:
            del self.SpecificCharacterSet
        self.PatientOrientation = list(orient)  # all letters, e.g. PH\\FP for an oblique sagittal slice
        on_grid = rgb.shape[:2] == (source.Rows, source.Columns) and all(k in source for k in GEOMETRY_TYPE1)
        if on_grid:
            for keyword in GEOMETRY_TYPE1 + GEOMETRY_TYPE2:
                if keyword in source:
                    self[keyword] = copy.deepcopy(source[keyword])
                else:
                    setattr(self, keyword, None)  # Type 2: present, empty
        if "BodyPartExamined" in source:
            self.BodyPartExamined = source.BodyPartExamined
        for keyword in ("Laterality", "ImageLaterality"):
            if keyword in source:
                self[keyword] = copy.deepcopy(source[keyword])
        if "BodyPartExamined" not in self and "Laterality" not in self:
            self.Laterality = ""  # Type 2C: the body part is unknown, so may be paired: present, empty
        if source.get("LossyImageCompression") == "01":
            self.LossyImageCompression = "01"
        self.ImageType = ["DERIVED", "SECONDARY"]
        self.ConversionType = "SYN"
        self.SyntheticData = "YES"
        self.BurnedInAnnotation = "YES" if banner else "NO"
        self.DerivationDescription = derivation[:1024]
        self.ImageComments = comments
        self.SourceImageSequence = [_reference(source, with_purpose=True)]
        ref_series = Dataset()
        ref_series.SeriesInstanceUID = source.SeriesInstanceUID
        ref_series.ReferencedInstanceSequence = [_reference(source, with_purpose=False)]
        self.ReferencedSeriesSequence = [ref_series]


def _check_own_text(**values: str | None) -> None:
    """What dicomnode writes itself must be valid in any source character set, and LO-sized."""
    for key, value in values.items():
        if value is not None and not value.isascii():
            raise ValueError(f"{key} must be ASCII (it is written in the source's character set)")
    if len(values["series_description"] or "") > 64:
        raise ValueError("series_description is longer than 64 characters")


def _orientation(src: Dataset) -> tuple[str, str]:
    if "ImageOrientationPatient" in src:
        return patient_orientation([float(v) for v in src.ImageOrientationPatient])
    given = src.get("PatientOrientation")
    if given is not None and len(given) == 2 and all(given):
        return str(given[0]), str(given[1])
    raise ValueError(f"source {src.get('SOPInstanceUID', '?')} has neither Image Orientation (Patient) "
                     "nor Patient Orientation")


def _pixel_spacing(src: Dataset, shape: tuple[int, int]) -> tuple[float, float] | None:
    """Source spacing, scaled when the image was resized, so the physical extent is unchanged."""
    if "PixelSpacing" not in src:
        return None
    dy, dx = (float(v) for v in src.PixelSpacing)
    return dy * src.Rows / shape[0], dx * src.Columns / shape[1]


def _equipment(src: Dataset, synthesiser: hd.ContributingEquipment) -> list[hd.ContributingEquipment]:
    """The MR scanner (when the source names it) and the synthesiser."""
    try:
        return [hd.ContributingEquipment.for_image_acquisition(src), synthesiser]
    except (AttributeError, ValueError):
        return [synthesiser]


def _source_key(src: Dataset) -> str:
    """What an output instance's UID is derived from: the source instance, and its frame if any."""
    frame = frame_of(src)
    return str(src.SOPInstanceUID) if frame is None else f"{src.SOPInstanceUID}/frame/{frame}"


def _reference(src: Dataset, with_purpose: bool) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = src.SOPClassUID
    item.ReferencedSOPInstanceUID = src.SOPInstanceUID
    if with_purpose and frame_of(src) is not None:  # the Image SOP Instance Reference Macro has it
        item.ReferencedFrameNumber = frame_of(src)
    if with_purpose:
        item.PurposeOfReferenceCodeSequence = [
            hd.sr.CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)]
    return item
