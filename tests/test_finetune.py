"""Fine-tuning from a model folder and comparing models: the bootstrap against hand-computed
intervals, --init really starts from the model's weights, and a fine-tuned model is a model folder
that `config check` accepts and whose card says where it came from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dicomnode.infer.model import load_model, read_card
from dicomnode.tools.phantom import generate
from tests.support.nodehelpers import make_raw_config, write_toml
from tests.support.tinymodel import make_tiny_model
from training.compare import bootstrap_ci, compare, verdict, verdict_line, write_comparison
from training.data import build_dataset
from training.finetune import finetune


def test_bootstrap_resamples_patients_not_slices():
    # Patient A: one slice, difference 1. Patient B: three slices, difference 3 each.
    # Mean over slices (1 + 9) / 4 = 2.5. A draw of two patients is (A, A) -> 1, (B, B) -> 3 or
    # (A, B) -> 2.5: the 95 % interval runs from 1 to 3.
    diff = np.array([1.0, 3.0, 3.0, 3.0])
    mean, lo, hi = bootstrap_ci(diff, ["A", "B", "B", "B"], draws=4000, seed=1)
    assert (mean, lo, hi) == (2.5, 1.0, 3.0)
    # Resampled by slice instead, (1, 1) would be as likely as any other mean; by patient a
    # constant difference gives a point interval.
    assert bootstrap_ci(np.full(6, 0.2), list("AABBCC"), draws=500) == pytest.approx((0.2, 0.2, 0.2))


@pytest.mark.parametrize("metric, lo, hi, want", [
    ("psnr", 0.1, 0.3, "better"), ("ssim", -0.3, -0.1, "worse"), ("mae", 0.1, 0.3, "worse"),
    ("mse", -0.3, -0.1, "better"), ("psnr", -0.1, 0.3, "indistinguishable"),
])
def test_verdict_direction(metric, lo, hi, want):
    assert verdict(metric, lo, hi) == want


def test_verdict_line_is_plain():
    rows = {"psnr": {"verdict": "better"}, "ssim": {"verdict": "indistinguishable"}, "mae": {"verdict": "better"},
            "mse": {"verdict": "worse"}}
    assert verdict_line("B", "A", rows).startswith("B is better than A on PSNR, MAE; worse than A on MSE; "
                                                   "indistinguishable on SSIM")
    same = {k: {"verdict": "indistinguishable"} for k in ("psnr", "ssim")}
    assert verdict_line("B", "A", same).startswith("B is indistinguishable from A on PSNR, SSIM")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ft")
    generate(root / "export", 6, seed=41, min_matrix=64, max_matrix=64, min_slices=8, max_slices=8)
    build_dataset(root / "export", root / "data", source="raw-pet", site_key=root / "key")
    return root / "data"


def test_init_starts_from_the_model_weights(data, tmp_path):
    from training import pix2pix

    tiny = make_tiny_model(tmp_path / "tiny")
    pix2pix.train(data, tmp_path / "p2p", init=tiny, steps=1, lr=0.0, batch_size=2, quiet=True, sample_every=10)
    G, preset, _ = pix2pix.load_generator(tmp_path / "p2p" / "checkpoint.pt")
    ref = load_model(tiny).generator.state_dict()
    assert preset == "tiny"
    for k, v in G.state_dict().items():
        if k.endswith("weight") and v.ndim == 4:  # convolutions (BatchNorm statistics are recalibrated)
            assert torch.allclose(v.float(), ref[k].float(), atol=1e-3), k


def test_a_fine_tuned_model_is_a_model_folder_with_its_provenance(data, tmp_path, port):
    tiny = make_tiny_model(tmp_path / "tiny")
    res = finetune(tiny, data, tmp_path / "site", pix2pix_steps=2, cddpm_steps=2, batch_size=2, quiet=True,
                   command="python -m training finetune ...")
    model = Path(res["model_dir"])
    card = read_card(model)
    prov = card["provenance"]
    assert prov["starting_model"] == "tiny-1" and card["version"] == "tiny-1+site"
    assert prov["data"]["deidentified"] and prov["data"]["source"] == "raw-pet"
    assert prov["data"]["counts"]["studies"] == 6 and all(1900 < y < 2100 for y in prov["data"]["study_years"])
    assert prov["recipe"]["pix2pix"]["steps"] == 2 and card["training"]["starting_model"] == "tiny-1"
    assert card["sampler"]["steps"] == read_card(tiny)["sampler"]["steps"]
    # six studies are too few to calibrate the safety gate: the model is left without one, and says so
    assert res["gate"].startswith("not calibrated:") and "gate" not in card
    s = compare([tiny, model], data, tmp_path / "cmp", split="train", draws=200, quiet=True)
    assert [m["model"] for m in s["models"]] == ["tiny-1", "tiny-1+site"]
    c = s["comparisons"][0]
    for k in ("psnr", "ssim", "mae", "mse"):
        lo, hi = c["metrics"][k]["ci95"]
        assert lo <= c["metrics"][k]["difference"] <= hi
    assert c["verdict"].startswith("tiny-1+site is ")
    for name in ("compare.json", "compare.md", "compare.png"):
        assert (tmp_path / "cmp" / name).stat().st_size > 100
    assert c["verdict"] in (tmp_path / "cmp" / "compare.md").read_text()
    write_comparison(model, s, tmp_path / "cmp" / "compare.md")
    assert read_card(model)["comparison"]["verdicts"] == [c["verdict"]]
    load_model(model)  # the card's checksums still hold
    raw = make_raw_config(tmp_path, port, inference={"model": str(model)})
    r = subprocess.run([sys.executable, "-m", "dicomnode.cli", "config", "check", "--config",
                        str(write_toml(tmp_path / "node.toml", raw))], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "tiny-1+site" in r.stdout + r.stderr
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["bootstrap"]["resampled"] == "patients"


def test_the_recipe_steps_follow_the_size_of_the_train_split(data, tmp_path):
    from training.finetune import RECIPE, SMALL_SLICES, recipe_steps

    assert recipe_steps(data) == RECIPE.small_steps  # a handful of studies
    big = tmp_path / "big"
    big.mkdir()
    header = "index,patient_id,study_uid,mr_series_uid,fusion_series_uid,slice_index,position_mm,uptake,lesion," \
             "phantom_case,split\n"
    rows = [f"{i},P1,S{i // 16},M,F,{i % 16},0,,0,,{'train' if i < SMALL_SLICES else 'val'}\n" for i in range(700)]
    (big / "pairs.csv").write_text(header + "".join(rows))
    assert recipe_steps(big) == RECIPE.steps
