"""bench/bench_ceiling.py's model scoring: Pix2Pix alone next to the full model, and the check of
the K-sample SD map against where the MR hides the uptake."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from dicomnode.infer.grid import GridPlacement
from dicomnode.infer.model import load_model
from dicomnode.tools.phantom.generate import plan_cases, simulate
from tests.support.tinymodel import make_tiny_model

_spec = importlib.util.spec_from_file_location("bench_ceiling", Path(__file__).parents[1] / "bench" / "bench_ceiling.py")
bc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bc)


@pytest.fixture(scope="module")
def case():
    return plan_cases(1, seed=5, lesion_fraction=1.0, min_matrix=64, max_matrix=64, min_slices=6, max_slices=6)[0]


def test_hidden_uptake_mask_is_lesion_and_myocardium(case):
    sim = simulate(case)
    place = GridPlacement.for_image(case.rows, case.cols, (sim.grid.row_spacing, sim.grid.col_spacing))
    hidden = bc.hidden_uptake_mask(case, sim, place)
    lesion = torch.from_numpy(np.stack([place.to_grid(k.astype(np.float32), fill=0.0) > 0.5 for k in sim.lesion_mask]))
    assert hidden.shape == lesion.shape == (case.slices, 256, 256)
    assert bool((hidden | ~lesion).all())  # every lesion pixel is hidden uptake
    assert int(hidden.sum()) > int(lesion.sum()) + 100  # and the myocardium is too
    assert hidden.float().mean() < 0.2  # but not the whole image


def test_sd_scores_measure_what_they_say():
    torch.manual_seed(0)
    real = torch.rand(2, 3, 32, 32)
    pred = real + 0.1 * torch.randn(2, 3, 32, 32)
    hidden = torch.zeros(2, 32, 32, dtype=torch.bool)
    hidden[:, 8:16, 8:16] = True
    s = bc.sd_scores(real, pred, (pred - real).abs(), hidden)
    assert s["model_sd_error_corr"] == pytest.approx([1.0, 1.0])  # SD equal to the error: perfect correlation
    sd = torch.full((2, 3, 32, 32), 0.01)
    sd[:, :, 8:16, 8:16] = 0.05
    s = bc.sd_scores(real, pred, sd, hidden)
    assert s["model_sd_hidden"] == pytest.approx([0.05, 0.05]) and s["model_sd_elsewhere"] == pytest.approx([0.01, 0.01])


def test_region_scores_split_the_error_where_it_is_made():
    real = torch.zeros(2, 3, 32, 32)
    pred = torch.zeros(2, 3, 32, 32)
    hidden = torch.zeros(2, 32, 32, dtype=torch.bool)
    hidden[:, :16, :16] = True  # a quarter of each slice
    lesion = torch.zeros_like(hidden)
    lesion[:, :16, :8] = True  # half of it is lesion, the other half myocardium
    pred[:, :, :16, 8:16] = 0.2  # a hot heart
    pred[:, :, 20:, 20:] = -0.1  # an error outside the hidden uptake
    hidden_mse, myo_bias = bc.region_scores(real, pred, hidden, lesion)
    assert hidden_mse == pytest.approx([0.04 * 128 / 1024] * 2)  # only the heart's squared error
    total = float(((pred - real) ** 2).mean(dim=(1, 2, 3))[0])
    assert total - hidden_mse[0] == pytest.approx(0.01 * 144 / 1024)  # the rest is the rest
    assert myo_bias == pytest.approx([0.2, 0.2])
    hidden_mse, myo_bias = bc.region_scores(real, pred, hidden, None)  # no lesion: all hidden is heart
    assert myo_bias == pytest.approx([0.1, 0.1])
    hidden[1] = False  # too few myocardium pixels on a slice: no bias for it
    assert len(bc.region_scores(real, pred, hidden, lesion)[1]) == 1


def test_model_scores_pix2pix_alone_and_the_sd_map(tmp_path, case):
    model = load_model(make_tiny_model(tmp_path / "m"))
    model.defaults["samples"] = 2
    scores = bc.score_case(case, 0, model)
    for name in ("model", "pix2pix"):
        assert len(scores[f"{name}_psnr"]) == case.slices and scores[f"{name}_lesion_bias"]
    assert scores["model_psnr"] != scores["pix2pix_psnr"]
    for name in ("model", "pix2pix", "ceiling", "floor"):
        assert len(scores[f"{name}_hidden_mse"]) == case.slices
        assert all(0 <= h <= m + 1e-9 for h, m in zip(scores[f"{name}_hidden_mse"], scores[f"{name}_mse"]))
    assert len(scores["model_sd_error_corr"]) == case.slices
    assert all(-1 <= c <= 1 for c in scores["model_sd_error_corr"])
    assert scores["model_sd_hidden"] and len(scores["model_sd_hidden"]) == len(scores["model_sd_elsewhere"])
    model.defaults["samples"] = 1  # one sample: no SD map
    sim = simulate(case)
    place = GridPlacement.for_image(case.rows, case.cols, (sim.grid.row_spacing, sim.grid.col_spacing))
    assert bc.model_fusion(model, sim, place, seed=0)[2] is None


def test_cohort_summary_pools_uptake_and_flags_under_showing_studies():
    def study(case, slices, model, bound, floor=-0.2):
        return {"case": case, "lesion": True, "slices": slices, "model_lesion_bias": model,
                "bound_lesion_bias": bound, "floor_lesion_bias": floor}
    per_case = [study("a", 10, -0.05, 0.02), study("b", 30, -0.10, -0.08), study("c", 10, -0.04, -0.02),
                {"case": "d", "lesion": False, "slices": 20}]
    # pooled over slices: model bias (-0.5 - 3.0 - 0.4) / 50 = -0.078, floor -0.2 -> 61 % shown
    assert bc.uptake_shown(per_case, "model") == pytest.approx(1 - 0.078 / 0.2, abs=1e-3)
    assert bc.uptake_shown(per_case, "typical") is None
    result = {"cases": 4, "slices": 70, "metric_note": "m", "per_case": per_case,
              **{f"{n}_{k}": {"mean": 1.0} for n in ("model", "bound", "floor") for k in ("psnr", "ssim", "mse")}}
    card = bc.cohort_summary(result, "python bench/bench_ceiling.py --cases 4")
    # a: -0.05 < min(0, 0.02) - 0.03 = -0.03 fails; b: -0.10 >= -0.11 passes; c: -0.04 >= -0.05 passes
    assert card["lesion_studies_under_showing"] == ["a"]
    assert card["lesion_studies"] == 3 and card["floor"]["uptake_shown"] == 0.0
    assert card["bound"]["uptake_shown"] == pytest.approx(1 - (0.2 - 2.4 - 0.2) / 50 / -0.2, abs=1e-3)
