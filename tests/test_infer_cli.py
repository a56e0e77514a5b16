"""`dicomnode infer` and `dicomnode demo` on a tiny random-weights model.

Random weights: these tests check the commands' mechanics (selection, outputs, previews, the
summary, exit codes, the demo's node -> local PACS loop), not image quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from pydicom import dcmread
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.config import InferenceConfig
from dicomnode.synthesize import DEFAULT_MODEL
from dicomnode.tools.phantom import write_case
from tests.support.nodehelpers import write_toml
from tests.support.tinymodel import TINY_INFERENCE, make_tiny_model

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tinytest")


@pytest.fixture(scope="module")
def inbox(tmp_path_factory) -> tuple[Path, dict, dict]:
    root = tmp_path_factory.mktemp("in")
    t2 = write_case(root / "a", 5, rows=48, cols=40, slices=4)
    t1 = write_case(root / "b", 6, rows=40, cols=40, slices=3, weighting="T1")
    (root / "README.txt").write_text("not DICOM")
    return root, t2, t1


def config(tmp_path, tiny) -> Path:
    return write_toml(tmp_path / "node.toml", {"rules": {"min_slices": 3},
                                               "inference": dict(TINY_INFERENCE, model=str(tiny), device="cpu")})


def test_infer_selects_synthesises_and_previews(tiny, inbox, tmp_path):
    root, t2, t1 = inbox
    out = tmp_path / "out"
    res = runner.invoke(app, ["infer", str(root), str(out), "--png", "--config", str(config(tmp_path, tiny))])
    assert res.exit_code == 0, res.output
    summary = {s["series_uid"]: s for s in json.loads((out / "infer.json").read_text())}
    assert set(summary) == {t2["mr_series_uid"], t1["mr_series_uid"], t2["pet_series_uid"], t1["pet_series_uid"],
                            t2["fusion_series_uid"], t1["fusion_series_uid"]}
    done = summary[t2["mr_series_uid"]]
    assert done["selected"] and done["outputs"] == 4 and done["error"] is None
    assert not summary[t1["mr_series_uid"]]["selected"] and not summary[t2["pet_series_uid"]]["selected"]
    files = sorted(Path(done["output_dir"]).glob("*.dcm"))
    assert len(files) == 4
    outs = [dcmread(f) for f in files]
    assert {o.ReferencedSeriesSequence[0].SeriesInstanceUID for o in outs} == {t2["mr_series_uid"]}
    assert all(o.Rows == 48 and o.Columns == 40 for o in outs)
    assert len(done["previews"]) == 4
    with Image.open(done["previews"][0]) as im:
        assert im.size == (40 + 4 + 40, 48)  # MR | synthetic
    assert "skipped" in res.output and "4 images" in res.output


def test_infer_all_and_model_override(tiny, inbox, tmp_path):
    root, t2, t1 = inbox
    out = tmp_path / "out"
    res = runner.invoke(app, ["infer", str(t1["mr"][0]).rsplit("/", 1)[0], str(out), "--all", "--model", str(tiny),
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    (done,) = json.loads((out / "infer.json").read_text())
    assert done["selected"] and done["reason"] == "--all" and done["outputs"] == 3


def test_infer_reports_a_failed_series_and_exits_1(tiny, tmp_path):
    case = write_case(tmp_path / "in", 8, rows=40, cols=40, slices=3)
    ds = dcmread(case["mr"][1])
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(case["mr"][1], enforce_file_format=True)
    res = runner.invoke(app, ["infer", str(Path(case["mr"][0]).parent), str(tmp_path / "out"), "--all",
                              "--model", str(tiny), "--device", "cpu"])
    assert res.exit_code == 1
    (failed,) = json.loads((tmp_path / "out" / "infer.json").read_text())
    assert "cannot decode pixel data" in failed["error"] and failed["outputs"] == 0


def test_missing_model_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("DICOMNODE_MODELS", str(tmp_path))
    res = runner.invoke(app, ["infer", str(tmp_path), str(tmp_path / "out"), "--model", "nosuch"])
    assert res.exit_code == 3 and "model 'nosuch' not found" in res.output
    if (Path(__file__).resolve().parents[1] / "models" / DEFAULT_MODEL / "model.json").exists():
        return  # the shipped model exists here: the demo would run, not fail
    res = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert res.exit_code == 3 and "shipped model" in res.output and not (tmp_path / "demo" / "sink").exists()


def test_demo_loop_with_local_pacs(tiny, tmp_path):
    """The demo's machinery (node on loopback, own SCU, local SCP, previews, metrics) on a small case."""
    from dicomnode.engine import Synthesis
    from dicomnode.tools.demo import run_case

    synth = Synthesis(InferenceConfig(model=str(tiny), device="cpu", **TINY_INFERENCE))
    case = write_case(tmp_path / "phantom", 2, rows=64, cols=64, slices=4, lesion=True)
    res = run_case(tmp_path / "demo", synth, case, {"model": str(tiny), "device": "cpu"},
                   rules={"min_slices": 3})
    assert res.job_state == "done" and len(res.received) == 4
    assert res.latency is not None and 0 < res.latency < 60
    assert {"preprocess", "infer", "encode", "write"} <= set(res.timings)
    assert len(res.previews) == 4
    with Image.open(res.previews[0]) as im:
        assert im.size == (64 * 3 + 8, 64)  # MR | synthetic | real fusion
    assert 0 < res.metrics["psnr_db"] < 60 and -1 <= res.metrics["ssim"] <= 1
