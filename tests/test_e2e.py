"""End to end: DCMTK storescu -> node (select, synthesise, encode) -> DCMTK storescp sink.

The node runs a tiny random-weights model (tests/support/tinymodel.py): these tests check mechanics
(selection, one output per slice, ordering, geometry, deterministic UIDs, names, transfer
syntaxes, dciodvfy validity, failure handling), never image quality.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import JPEG2000Lossless

from dicomnode.config import InferenceConfig, config_from_dict
from dicomnode.encode import instance_uid, series_uid
from dicomnode.engine import Synthesis
from dicomnode.node import Node
from dicomnode.spool import Spool
from dicomnode.synthesize import load_synthesizer, output_variant
from dicomnode.tools.phantom import write_case
from tests.support.nodehelpers import make_raw_config
from tests.support.peers import dcmtk, free_port, run
from tests.support.tinymodel import TINY_INFERENCE, make_tiny_model, rotate_series, slice_location

pytestmark = pytest.mark.integration

SLICES = 4
# name -> (phantom options, storescu transfer syntax flag, how the files are changed before sending)
CASES = {
    "siemens-latin1-shuffled": (dict(vendor="siemens", rows=64, cols=64, patient_name="Müller^Jürgen",
                                     specific_character_set="ISO_IR 100"), "-x=", "shuffle"),
    "ge-utf8-nonsquare-jpegll": (dict(vendor="ge", rows=80, cols=64, patient_name="Gößmann^Zoë"), "-xs", "jpegll"),
    "philips-j2k": (dict(vendor="philips", rows=72, cols=72), "-xv", "j2k"),
    "siemens-rle-oblique": (dict(vendor="siemens", rows=64, cols=48), "-xr", "rle+oblique"),
    "ge-320": (dict(vendor="ge", rows=320, cols=320), "-x=", ""),
    "t1-rejected": (dict(vendor="siemens", rows=48, cols=48, weighting="T1"), "-x=", ""),
    "axial-rejected": (dict(vendor="philips", rows=48, cols=48, orientation="axial"), "-x=", ""),
    "truncated": (dict(vendor="siemens", rows=64, cols=64), "-x=", "truncate"),
}
SELECTED = ("siemens-latin1-shuffled", "ge-utf8-nonsquare-jpegll", "philips-j2k", "siemens-rle-oblique", "ge-320")


def prepare(name: str, folder: Path, seed: int) -> tuple[list[Path], list[Path]]:
    """Write one case's MR series and transform it; return (pristine copies, files to send)."""
    opts, _, how = CASES[name]
    rec = write_case(folder / "phantom", seed, slices=SLICES, lesion=True, **opts)
    send = folder / "send"
    send.mkdir()
    files = [Path(shutil.copy(p, send / f"{i:03d}.dcm")) for i, p in enumerate(rec["mr"])]
    if "oblique" in how:
        rotate_series(files, 15.0, axis=(0.0, 1.0, 0.3))
    pristine = [Path(shutil.copy(p, folder / f"orig{i:03d}.dcm")) for i, p in enumerate(files)]
    if "jpegll" in how:
        for p in files:
            run([dcmtk("dcmcjpeg"), str(p), str(p)])
    if "rle" in how:
        for p in files:
            run([dcmtk("dcmcrle"), str(p), str(p)])
    if "j2k" in how:
        for p in files:
            ds = dcmread(p)
            ds.compress(JPEG2000Lossless, generate_instance_uid=False)
            ds.save_as(p, enforce_file_format=True)
    if how == "truncate":  # pixel data cut short (a consistent element, so storescu sends it)
        ds = dcmread(files[1])
        ds.PixelData = ds.PixelData[:len(ds.PixelData) // 2]
        ds.save_as(files[1], enforce_file_format=True)
    if how == "shuffle":
        random.Random(seed).shuffle(files)
    return pristine, files


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One node with the tiny model, a storescp sink, and every case sent with storescu."""
    tmp = tmp_path_factory.mktemp("e2e")
    model = make_tiny_model(tmp / "tinytest")
    sink_dir = tmp / "sink"
    sink_dir.mkdir()
    sink_port, port = free_port(), free_port()
    sink = subprocess.Popen([dcmtk("storescp"), "-aet", "SINK", "-od", str(sink_dir), str(sink_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    inference = dict(TINY_INFERENCE, model=str(model), device="cpu", timeout_seconds=120.0)
    cfg = config_from_dict(make_raw_config(
        tmp, port, series={"quiet_seconds": 3.0, "settle_seconds": 0.2}, rules={"min_slices": 3},
        inference=inference, destinations=[{"name": "sink", "ae_title": "SINK", "host": "127.0.0.1",
                                            "port": sink_port}]))
    synth = load_synthesizer(InferenceConfig(**inference))
    cases = {}
    try:
        with Node(cfg, Synthesis(InferenceConfig(**inference)), serve_metrics=False) as node:
            for seed, name in enumerate(CASES):
                pristine, files = prepare(name, tmp / name, seed + 11)
                sent = run([dcmtk("storescu"), "-aec", "DICOMNODE", "-aet", "SCANNER", CASES[name][1],
                            "127.0.0.1", str(port), *map(str, files)], check=name != "truncated")
                if name == "truncated":  # the scanner is told that a slice is broken (0xC000)
                    assert sent.returncode != 0
                cases[name] = pristine
            deadline = time.time() + 120
            while time.time() < deadline and len(node.journal.jobs(["done", "failed", "ignored"])) < len(CASES):
                time.sleep(0.2)
            jobs = {j.series_uid: j for j in node.journal.jobs()}
    finally:
        sink.terminate()
        sink.wait(10)
    received = [dcmread(p) for p in sorted(sink_dir.glob("*"))]
    return {"cases": cases, "jobs": jobs, "received": received, "synth": synth, "store": tmp / "store"}


def outputs_for(world, name):
    src_series = str(dcmread(world["cases"][name][0], stop_before_pixels=True).SeriesInstanceUID)
    outs = [o for o in world["received"] if o.ReferencedSeriesSequence[0].SeriesInstanceUID == src_series]
    return world["jobs"][src_series], outs


@pytest.mark.parametrize("name", SELECTED)
def test_selected_series_yields_one_valid_output_per_slice(world, name):
    job, outs = outputs_for(world, name)
    assert job.state == "done", job.error
    assert {"select", "preprocess", "infer", "postprocess", "encode", "write"} <= set(job.timings)
    sources = [dcmread(p) for p in world["cases"][name]]
    assert len(outs) == len(sources) == SLICES
    s = world["synth"]
    variant = output_variant(s.settings, sources)
    by_uid = {d.SOPInstanceUID: d for d in sources}
    assert {o.SOPInstanceUID for o in outs} == {instance_uid(u, "tinytest", "tiny-1", variant) for u in by_uid}
    assert {o.SeriesInstanceUID for o in outs} == {series_uid(sources[0].SeriesInstanceUID, "tinytest", "tiny-1",
                                                               variant)}
    outs = sorted(outs, key=lambda o: int(o.InstanceNumber))
    src = [by_uid[o.SourceImageSequence[0].ReferencedSOPInstanceUID] for o in outs]
    locs = [slice_location(d) for d in src]
    assert locs == sorted(locs)  # instance numbers follow the position along the normal
    for o, d in zip(outs, src):
        assert (o.Rows, o.Columns, o.SamplesPerPixel) == (d.Rows, d.Columns, 3)
        assert str(o.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.1"
        assert np.allclose([float(v) for v in o.ImagePositionPatient], [float(v) for v in d.ImagePositionPatient])
        assert np.allclose([float(v) for v in o.ImageOrientationPatient],
                           [float(v) for v in d.ImageOrientationPatient])
        assert o.FrameOfReferenceUID == d.FrameOfReferenceUID and o.StudyInstanceUID == d.StudyInstanceUID
        assert o.get("SpecificCharacterSet") == d.get("SpecificCharacterSet")
        assert str(o.PatientName) == str(d.PatientName)
        assert o.PatientName.original_string == d.PatientName.original_string
        assert o.SyntheticData == "YES" and o.SeriesDescription.startswith("SYNTHETIC")


def test_every_output_is_dciodvfy_clean(world):
    if not shutil.which("dciodvfy"):
        pytest.skip("dciodvfy not installed")
    assert len(world["received"]) == SLICES * len(SELECTED)
    for o in world["received"]:
        res = subprocess.run(["dciodvfy", o.filename], capture_output=True, text=True, timeout=60)
        lines = (res.stdout + res.stderr).splitlines()
        assert any("SCImage" in line for line in lines), lines
        assert [line for line in lines if line.startswith("Error")] == [], o.filename


@pytest.mark.parametrize("name", ["t1-rejected", "axial-rejected"])
def test_rejected_series_yield_nothing(world, name):
    job, outs = outputs_for(world, name)
    assert job.state == "ignored" and job.reason and outs == []


def test_a_truncated_slice_is_refused_and_its_series_yields_no_output(world):
    job, outs = outputs_for(world, "truncated")
    assert job.state in ("failed", "ignored")  # a series with a slice missing is not synthesised
    assert outs == []
    spool = Spool(world["store"])
    assert list(spool.output_dir(outputs_for(world, SELECTED[0])[0].id).glob("*.dcm"))  # where outputs would be
    assert not list(spool.output_dir(job.id).glob("*"))
