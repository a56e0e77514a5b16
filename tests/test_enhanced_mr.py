"""Enhanced MR in: a sagittal T2FS sent as one multi-frame Enhanced MR Image or Legacy Converted
Enhanced MR Image (the phantom writes both) is selected from its functional groups, synthesised
frame by frame, and encoded as one Secondary Capture per frame that references its source
instance and frame number; the outputs are dciodvfy clean."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.config import InferenceConfig, RulesConfig, config_from_dict
from dicomnode.engine import Synthesis
from dicomnode.frames import ENHANCED_MR, LEGACY_CONVERTED_ENHANCED_MR, expand, frame_of
from dicomnode.node import Node
from dicomnode.rules import evaluate_paths
from dicomnode.tools.phantom import write_case
from tests.support.nodehelpers import make_raw_config, write_toml
from tests.support.peers import dcmtk, run
from tests.support.tinymodel import TINY_INFERENCE, make_tiny_model

FORMATS = {"legacy-enhanced": LEGACY_CONVERTED_ENHANCED_MR, "enhanced": ENHANCED_MR}


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("enhanced")
    return {fmt: write_case(root / fmt, 3, rows=64, cols=56, slices=12, mr_format=fmt) for fmt in FORMATS}


@pytest.mark.parametrize("fmt", FORMATS)
def test_rules_read_the_frames(cases, fmt):
    (path,) = cases[fmt]["mr"]
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == FORMATS[fmt] and int(ds.NumberOfFrames) == 12
    (decision,) = evaluate_paths(RulesConfig(), [Path(path)])
    assert decision.matched, decision.reason
    assert decision.slices == 12
    evidence = "Spectrally Selected Suppression FAT" if fmt == "enhanced" else "Scan Options FS"
    assert evidence in decision.reason
    geometry = next(c for c in decision.checks if c["check"] == "geometry")
    assert geometry["detail"].startswith("12 frames 64x56")
    views = expand([ds])
    assert [frame_of(v) for v in views] == list(range(1, 13))
    assert [float(v.ImagePositionPatient[0]) for v in views] == sorted(float(v.ImagePositionPatient[0]) for v in views)


def test_a_rule_that_fails_names_the_frame(cases, tmp_path):
    ds = pydicom.dcmread(cases["enhanced"]["mr"][0])
    per_frame = ds.PerFrameFunctionalGroupsSequence
    per_frame[4].PlanePositionSequence[0].ImagePositionPatient = per_frame[3].PlanePositionSequence[0].ImagePositionPatient
    ds.save_as(tmp_path / "dup.dcm", enforce_file_format=True)
    (decision,) = evaluate_paths(RulesConfig(), [tmp_path / "dup.dcm"])
    assert not decision.matched and "frame 4 of instance #1" in decision.reason and "frame 5" in decision.reason


def test_a_header_check_that_fails_names_the_frame_it_read(tmp_path):
    record = write_case(tmp_path / "t1", 4, rows=48, cols=48, slices=10, weighting="T1", mr_format="legacy-enhanced")
    (decision,) = evaluate_paths(RulesConfig(description_exclude=""), [Path(record["mr"][0])])
    assert not decision.matched
    assert decision.reason.startswith("weighting: T1-like timing") and decision.reason.endswith("(frame 1 of instance #1)")


def test_a_multiframe_object_that_is_not_mr_is_still_refused(cases, tmp_path):
    ds = pydicom.dcmread(cases["legacy-enhanced"]["mr"][0])
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT
    ds.save_as(tmp_path / "ct.dcm", enforce_file_format=True)
    (decision,) = evaluate_paths(RulesConfig(sop_classes=[*RulesConfig().sop_classes, ds.SOPClassUID]),
                                 [tmp_path / "ct.dcm"])
    assert not decision.matched and "not Enhanced MR" in decision.reason


@pytest.mark.parametrize("fmt", FORMATS)
def test_one_secondary_capture_per_frame_referencing_its_frame(cases, fmt, tmp_path):
    tiny = make_tiny_model(tmp_path / "tiny")
    toml = write_toml(tmp_path / "node.toml", {"inference": dict(TINY_INFERENCE, model=str(tiny), device="cpu")})
    source = pydicom.dcmread(cases[fmt]["mr"][0])
    res = CliRunner().invoke(app, ["infer", str(Path(cases[fmt]["mr"][0]).parent), str(tmp_path / "out"),
                                   "--config", str(toml)])
    assert res.exit_code == 0, res.output
    outputs = [pydicom.dcmread(p) for p in sorted((tmp_path / "out").rglob("*.dcm"))]
    assert len(outputs) == 12 and len({o.SOPInstanceUID for o in outputs}) == 12
    refs = sorted((int(o.SourceImageSequence[0].ReferencedFrameNumber), o) for o in outputs)
    assert [n for n, _ in refs] == list(range(1, 13))
    for n, out in refs:
        item = out.SourceImageSequence[0]
        assert item.ReferencedSOPInstanceUID == source.SOPInstanceUID and item.ReferencedSOPClassUID == FORMATS[fmt]
        assert out.SyntheticData == "YES" and out.StudyInstanceUID == source.StudyInstanceUID
        position = source.PerFrameFunctionalGroupsSequence[n - 1].PlanePositionSequence[0].ImagePositionPatient
        assert [float(v) for v in out.ImagePositionPatient] == pytest.approx([float(v) for v in position])
    if shutil.which("dciodvfy"):
        for p in sorted((tmp_path / "out").rglob("*.dcm"))[:3]:
            r = subprocess.run(["dciodvfy", str(p)], capture_output=True, text=True, timeout=60)
            assert [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("Error")] == [], p


@pytest.mark.integration
def test_an_enhanced_mr_sent_by_c_store_comes_out_as_one_image_per_frame(cases, tmp_path, port):
    inference = dict(TINY_INFERENCE, model=str(make_tiny_model(tmp_path / "tiny")), device="cpu")
    cfg = config_from_dict(make_raw_config(tmp_path, port, series={"quiet_seconds": 1.0}, inference=inference))
    with Node(cfg, Synthesis(InferenceConfig(**inference)), serve_metrics=False) as node:
        run([dcmtk("storescu"), "-aec", "DICOMNODE", "127.0.0.1", str(port), cases["enhanced"]["mr"][0]])
        assert node.wait_idle(120)
        (job,) = node.journal.jobs()
        assert job.state == "done" and job.outputs == 12, job
