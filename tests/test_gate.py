"""The safety gate (dicomnode.infer.gate): what its measurements respond to, its calibration from a
paired data set, the shipped model's gate on phantom series, and what the node and `infer` do with
a series outside the training data ([safety] refuse or flag), with the metrics and the audit trail."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom import dcmread

from dicomnode.infer import gate as g
from dicomnode.infer.model import load_model, read_card
from dicomnode.infer.nets import build_generator
from dicomnode.infer.preprocess import prepare_series
from dicomnode.journal import Journal
from dicomnode.modelpath import ModelError, resolve_model
from dicomnode.tools.phantom import generate
from dicomnode.tools.phantom.generate import write_case
from tests.support.nodehelpers import make_raw_config, wait_for, write_toml
from tests.support.peers import dcmtk, free_port, run, wait_for_node
from tests.support.tinymodel import make_calibrated_tiny_model, make_tiny_model, ood_series
from training.calibrate import calibrate
from training.data import build_dataset


def _body(size: int = 256, value: float = 0.5) -> torch.Tensor:
    """A tall ellipse of `value` (in [0, 1]) on an empty field, as the model input in [-1, 1]."""
    y, x = np.mgrid[:size, :size]
    inside = ((y - size / 2) / (0.4 * size)) ** 2 + ((x - size / 2) / (0.2 * size)) ** 2 <= 1
    return torch.from_numpy(np.where(inside, value, 0.0).astype(np.float32) * 2 - 1)[None, None]


def _stat(x: torch.Tensor, name: str) -> float:
    return float(g.image_stats(x)[0, g.IMAGE_STATS.index(name)])


def test_ghosting_finds_a_shifted_copy():
    body = _body(value=0.6)
    u = (body + 1) / 2
    ghosted = (u + 0.3 * (u.roll(64, 3) + u.roll(-64, 3))).clamp(0, 1) * 2 - 1  # copies a quarter of the field away
    assert _stat(ghosted, "ghosting") > 3 * _stat(body, "ghosting")
    assert _stat(body.transpose(2, 3), "ghosting") == pytest.approx(_stat(body, "ghosting"), abs=1e-4)


def test_image_statistics_respond_to_what_they_name():
    body = _body()
    # Body share: the ellipse's area pi * 0.4 * 0.2 of the field (the 9-pixel blur widens it by about 10 %).
    assert _stat(body, "body") == pytest.approx(math.pi * 0.08, rel=0.15)
    # mean signal in the body mask: 0.5 inside the ellipse, 0 in the rim the blur adds
    assert _stat(body, "mean") == pytest.approx(0.5 * float((body > -1).float().mean()) / _stat(body, "body"), rel=0.01)
    assert _stat(body, "bright") < 0.01 and _stat(_body(value=0.9), "bright") > 0.85  # the rim is not bright
    noisy = body + 0.1 * torch.randn(body.shape, generator=torch.Generator().manual_seed(0)) * (body > -1)
    # Gaussian noise of SD 0.05 (in [0, 1]) minus its 3 x 3 mean has SD 0.05 * sqrt(8/9): mean |.| = that
    # * sqrt(2/pi), relative to the body's mean signal
    expected = 0.05 * math.sqrt(8 / 9) * math.sqrt(2 / math.pi) / _stat(body, "mean")
    assert _stat(noisy, "noise") - _stat(body, "noise") == pytest.approx(expected, rel=0.2)
    ramp = torch.linspace(0.2, 1.0, 256)[None, None, :, None]  # signal falling fivefold from bottom to top
    biased = ((body + 1) / 2 * ramp) * 2 - 1
    inside = body > -1
    level = ramp.expand_as(body)
    top, bottom = level[..., :128, :][inside[..., :128, :]], level[..., 128:, :][inside[..., 128:, :]]
    assert _stat(biased, "falloff_rows") == pytest.approx(abs(math.log(top.mean() / bottom.mean())), rel=0.25)
    assert _stat(biased, "falloff_cols") < 0.01
    assert _stat(body, "elongation") == pytest.approx(math.log(2), abs=0.15)  # tall: twice as high as wide
    assert _stat(body.transpose(2, 3), "elongation") == pytest.approx(-math.log(2), abs=0.15)


def test_encoder_features_are_the_generators_contracting_path():
    torch.manual_seed(0)
    gen = build_generator("tiny").eval()
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    with torch.inference_mode():
        f = gen.encoder_features(x)
        first = gen.model.model[0](x)  # the outermost level's down-convolution
    # tiny: ngf 4, levels of 4, 8, 16, 32, 32 channels, a mean and an SD each
    assert f.shape == (2, 2 * (4 + 8 + 16 + 32 + 32))
    assert torch.allclose(f[:, :4], first.mean((2, 3)), atol=1e-6)
    assert torch.allclose(f[:, 4:8], first.std((2, 3)), atol=1e-6)


def test_mahalanobis_distance_by_hand():
    precision = torch.diag(torch.tensor([1 / 4, 1.0]))  # SDs 2 and 1
    d = g._mahalanobis(torch.tensor([[2.0, 1.0], [0.0, 0.0], [-4.0, 0.0]]), torch.zeros(2), precision)
    assert d.tolist() == pytest.approx([math.sqrt(2), 0.0, 2.0])
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(20000, 2)) * [2.0, 1.0])
    mean, prec = g.fit_gaussian(x, shrink=0.0)
    assert prec.numpy() == pytest.approx(np.diag([0.25, 1.0]), abs=0.02)


def _fusion_of(mr: torch.Tensor, pet: torch.Tensor, opacity: float = 0.5) -> torch.Tensor:
    """A fusion in [-1, 1]: grey MR blended with a red-to-yellow PET colour (hot's lower half)."""
    grey = (mr + 1) / 2
    colour = torch.cat([pet.clamp(0, 1), (2 * pet - 1).clamp(0, 1), torch.zeros_like(pet)], 1)
    return ((1 - opacity) * grey + opacity * colour) * 2 - 1


def test_output_check_catches_colour_in_the_air_a_collapse_and_saturation():
    mr = _body(64, value=0.6)
    inside = (mr > -1).float()
    uptake = 0.3 * inside * torch.linspace(0.3, 1.0, 64)[None, None, :, None]
    real = torch.stack([g.output_stats(_fusion_of(mr, uptake * k), mr, 0.5) for k in (0.8, 1.0, 1.2)])
    gate = g.Gate(*(torch.zeros(1),) * 5, 1.0, 1.0, 1.0, *g.output_bounds(real, 1.5))
    assert gate.check_output(_fusion_of(mr, uptake), mr).passed
    air = gate.check_output(_fusion_of(mr, uptake + 0.5 * (1 - inside)), mr)
    assert not air.passed and air.failures[0].startswith("outside")
    flat = gate.check_output(_fusion_of(mr, 0.0 * uptake), mr)  # a collapsed output: no uptake at all
    assert {f.split()[0] for f in flat.failures} == {"uptake", "spread"}
    white = gate.check_output(torch.ones(1, 3, 64, 64), mr)
    assert "saturated" in {f.split()[0] for f in white.failures}
    assert "output unlike any training fusion" in white.reason()


# -- calibration from a paired data set, with a tiny model -------------------------------------

@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> Path:
    return make_calibrated_tiny_model(tmp_path_factory.mktemp("gate"))


def test_calibration_writes_the_gate_and_its_card_block(calibrated):
    card = read_card(calibrated)
    block = card["gate"]
    assert block["file"] == g.GATE_FILE and (calibrated / g.GATE_FILE).is_file()
    # readable by whoever reads the card (the node's user), not only by the one who calibrated
    assert (calibrated / g.GATE_FILE).stat().st_mode & 0o777 == (calibrated / "model.json").stat().st_mode & 0o777
    assert block["data"]["train_series"] >= 10 and block["data"]["val_series"] >= 3
    # thresholds: margins 1.5, 2.0 and 1.25 x the largest validation series' value
    spread = block["distances"]
    assert block["feature_threshold"] == pytest.approx(1.5 * spread["val_features_p50_max"][1], rel=0.001)
    assert block["stats_threshold"] == pytest.approx(2.0 * spread["val_statistics_p50_max"][1], rel=0.001)
    assert block["ghost_threshold"] == pytest.approx(1.25 * spread["val_ghosting_p50_max"][1], rel=0.001)
    gate = g.load_gate(calibrated, card)
    assert gate is not None and gate.feature_precision.shape == (184, 184)
    (calibrated / g.GATE_FILE).write_bytes((calibrated / g.GATE_FILE).read_bytes()[:-1] + b"\0")
    with pytest.raises(ModelError, match="checksum mismatch"):
        g.load_gate(calibrated, card)
    calibrate(calibrated, calibrated.parent / "data")  # recalibrating repairs it


def test_too_few_series_to_calibrate_is_a_clear_error(tmp_path):
    generate(tmp_path / "export", 4, seed=52, min_matrix=64, max_matrix=64, min_slices=8, max_slices=8, pet_grid="mr")
    build_dataset(tmp_path / "export", tmp_path / "data", source="fusion-sc", site_key=tmp_path / "key")
    with pytest.raises(ValueError, match="the gate needs at least 10 and 3"):
        calibrate(make_tiny_model(tmp_path / "tiny"), tmp_path / "data")


# -- the shipped model's gate ------------------------------------------------------------------

@pytest.fixture(scope="module")
def shipped():
    path = resolve_model("default")
    model = load_model(path, "cpu")
    gate = g.load_gate(path, model.card)
    assert gate is not None, "the shipped model has no calibrated gate"
    return model, gate


@pytest.mark.parametrize("content, passes", [("", True), ("STIR", True), ("T1", False), ("T2", False),
                                             ("noise", False), ("ghosting", False), ("inhomogeneity", False),
                                             ("region", False)])
def test_the_shipped_gate_on_phantom_series(shipped, tmp_path, content, passes):
    """A fresh seed: a T2FS series and a STIR pass, other contents under the same T2FS header do not."""
    model, gate = shipped
    info = write_case(tmp_path, 7103, rows=256, cols=256, slices=12, content=content)
    score = gate.score(model.generator, prepare_series(info["mr"]).batch)
    assert score.passed is passes, score.reason()


# -- what the node and `infer` do with it ------------------------------------------------------

def test_the_node_refuses_a_series_outside_the_training_data(calibrated, tmp_path, port):
    mport = free_port()
    raw = make_raw_config(tmp_path, port, metrics={"enabled": True, "host": "127.0.0.1", "port": mport},
                          inference={"model": str(calibrated), "device": "cpu", "steps": 1, "warm_start": 0.3},
                          series={"quiet_seconds": 1.0})
    toml = write_toml(tmp_path / "node.toml", raw)
    proc = subprocess.Popen([sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(toml)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_node(proc, port, timeout=60)
        run([dcmtk("storescu"), "-aec", "DICOMNODE", "127.0.0.1", str(port), *map(str, ood_series(tmp_path / "in", "noise"))])
        metrics = lambda: urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()  # noqa: E731
        assert wait_for(lambda: 'dicomnode_jobs{state="ignored"} 1.0' in metrics(), 90), metrics()
        body = metrics()
        assert 'dicomnode_safety_series_total{action="refused",check="input"} 1.0' in body
        assert "dicomnode_input_score_count 1.0" in body
        assert 'dicomnode_input_score_bucket{le="1.0"} 0.0' in body
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert "not synthesised: input outside the model's training data: score" in out
    journal = Journal(tmp_path / "store" / "journal.sqlite")
    job = journal.jobs()[0]
    assert job.state == "ignored" and job.reason.startswith("input outside the model's training data")
    assert not job.outputs
    assert any("input outside" in (e["detail"] or "") for e in journal.events(job.id))


def test_infer_flags_a_series_outside_the_training_data(calibrated, tmp_path):
    files = ood_series(tmp_path / "in", "noise")
    toml = write_toml(tmp_path / "node.toml", {"safety": {"input": "flag", "output": "off"},
                                               "inference": {"steps": 1, "warm_start": 0.3}})
    proc = subprocess.run([sys.executable, "-m", "dicomnode.cli", "infer", str(files[0].parent), str(tmp_path / "out"),
                           "--model", str(calibrated), "--device", "cpu", "--all", "--config", str(toml)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "safety: flagged (input), input score" in proc.stdout
    outcome = json.loads((tmp_path / "out" / "infer.json").read_text())[0]
    assert outcome["safety"] == "flagged (input)" and outcome["input_score"] > 1
    out = [dcmread(p) for p in Path(outcome["output_dir"]).glob("*.dcm")]
    assert len(out) == 8
    assert {ds.SeriesDescription for ds in out} == {"INPUT OUTSIDE TRAINING DATA - SYNTHETIC PET/T2FS"}
    assert all("INPUT OUTSIDE TRAINING DATA" in ds.ImageComments and ds.BurnedInAnnotation == "YES" for ds in out)
    # refuse (the default): no output, the reason printed, not an error
    proc = subprocess.run([sys.executable, "-m", "dicomnode.cli", "infer", str(files[0].parent), str(tmp_path / "out2"),
                           "--model", str(calibrated), "--device", "cpu", "--all"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "REFUSED by the safety gate (input outside the model's training data: score" in proc.stdout
    assert not list((tmp_path / "out2").rglob("*.dcm"))


def test_rules_test_prints_the_gate_decision(calibrated, tmp_path):
    ok = write_case(tmp_path / "ok", 51, rows=64, cols=64, slices=8, pet_grid="mr")
    files = [Path(ok["mr"][0]).parent, ood_series(tmp_path / "bad", "noise")[0].parent]
    toml = write_toml(tmp_path / "node.toml", {"inference": {"model": str(calibrated)}})
    proc = subprocess.run([sys.executable, "-m", "dicomnode.cli", "rules", "test", *map(str, files), "--config",
                           str(toml), "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    gates = [d["gate"] for d in json.loads(proc.stdout)]
    assert [x["decision"] for x in gates] == ["pass", "refuse"]
    assert gates[0]["input_score"] <= 1 < gates[1]["input_score"]
    text = subprocess.run([sys.executable, "-m", "dicomnode.cli", "rules", "test", *map(str, files), "--config",
                           str(toml)], capture_output=True, text=True, timeout=300).stdout
    assert "gate: input score" in text and ": refuse (input outside" in text
