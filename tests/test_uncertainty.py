"""`[output] uncertainty = true`: a second synthetic series with the K-sample SD map, marked
synthetic like the fusion, referencing the same slices, dciodvfy-clean, with deterministic UIDs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from dicomnode.config import InferenceConfig
from dicomnode.encode import SD_DISPLAY_MAX, UNCERTAINTY_DESCRIPTION, uncertainty_image
from dicomnode.infer.model import ModelError
from dicomnode.synthesize import load_synthesizer
from dicomnode.tools.phantom import write_case
from tests.support.tinymodel import TINY_INFERENCE, make_tiny_model
from tests.test_synthesizer import dciodvfy_errors


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tinytest")


def test_the_uncertainty_series(tiny, tmp_path):
    case = write_case(tmp_path / "case", 3, rows=72, cols=56, slices=4)
    inference = InferenceConfig(model=str(tiny), device="cpu", **(TINY_INFERENCE | {"samples": 3}))
    synth = load_synthesizer(inference, uncertainty=True)
    sources = [dcmread(p) for p in case["mr"]]
    result = synth.process(None, sources)
    series = {}
    for ds in result.datasets:
        series.setdefault(ds.SeriesInstanceUID, []).append(ds)
    assert len(series) == 2 and all(len(v) == 4 for v in series.values())
    (maps,) = [v for v in series.values() if v[0].SeriesDescription == UNCERTAINTY_DESCRIPTION]
    (fusion,) = [v for v in series.values() if v is not maps]
    src_uids = {ds.SOPInstanceUID for ds in sources}
    for ds in maps:
        assert ds.SyntheticData == "YES" and ds.ConversionType == "SYN" and ds.BurnedInAnnotation == "YES"
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID in src_uids
        assert "standard deviation" in ds.DerivationDescription and ds.Rows == 72 and ds.Columns == 56
        assert int(ds.SeriesNumber) == int(fusion[0].SeriesNumber) + 1000
    assert len({int(ds.pixel_array.std() > 0) for ds in maps}) == 1 and maps[0].pixel_array.std() > 0
    path = tmp_path / "sd.dcm"
    maps[0].save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    again = load_synthesizer(inference, uncertainty=True).process(None, [dcmread(p) for p in case["mr"]])
    assert [d.SOPInstanceUID for d in again.datasets] == [d.SOPInstanceUID for d in result.datasets]
    without = load_synthesizer(inference).process(None, [dcmread(p) for p in case["mr"]])
    assert [d.SOPInstanceUID for d in without.datasets] == [d.SOPInstanceUID for d in fusion]  # fusion unchanged


def test_uncertainty_needs_samples(tiny):
    with pytest.raises(ModelError, match="needs at least 2 samples"):
        load_synthesizer(InferenceConfig(model=str(tiny), device="cpu", **(TINY_INFERENCE | {"samples": 1})),
                         uncertainty=True)


def test_the_colour_scale_is_fixed_and_labelled():
    sd = np.zeros((64, 64), np.float32)
    sd[10:20, 10:20] = 2 * SD_DISPLAY_MAX  # above the scale: the top colour, not a rescaled map
    img = uncertainty_image(sd)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert tuple(img[15, 15]) == (252, 255, 164) and tuple(img[40, 30]) == (0, 0, 4)
    bar = img[10:58, 64 - 1 - 64 // 24:63]
    assert bar[:, :, 0].std() > 30  # the scale bar's gradient
