"""bench/bench_ceiling.py's model scoring: Pix2Pix alone next to the full model, the check of the
K-sample SD map against where the MR hides the uptake, and the lesion observer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from dicomnode.infer.grid import GridPlacement
from dicomnode.infer.model import load_model
from dicomnode.tools.fusion import OPACITY, SUV_WINDOW, hot_colormap, render_fusion
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
    for name in ("real", "model", "pix2pix", "ceiling"):  # one observer score per study and design
        for design in bc.OBSERVER_DESIGNS:
            (v,) = scores[f"{name}_spine_{design}"]
            assert 0.0 <= v <= 1.0
    assert not any(k.startswith("floor_spine_") for k in scores)
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
    assert "lesion_observer" not in card and "lesion_auc" not in card["model"]
    result.update({"real_lesion_auc": 0.9, "real_lesion_sensitivity": 0.8, "real_lesion_specificity": 0.7,
                   "model_lesion_auc": 0.85, "model_lesion_sensitivity": 0.75, "model_lesion_specificity": 0.65,
                   "model_lesion_sensitivity_own": 0.5,
                   "lesion_observer": {"design": "p99", "reads": "r", "threshold": 0.123456, "chosen_on": "c"}})
    card = bc.cohort_summary(result, "python bench/bench_ceiling.py --cases 4")
    assert card["model"]["lesion_auc"] == 0.85 and card["model"]["lesion_specificity"] == 0.65
    assert "lesion_sensitivity_own" not in card["model"]
    assert card["lesion_observer"] == {"reads": "r", "threshold": 0.1235, "chosen_on": "c",
                                       "real": {"auc": 0.9, "sensitivity": 0.8, "specificity": 0.7}}


def test_pet_colour_undoes_the_fusion_blend():
    t2 = np.tile(np.linspace(0, 1000, 32, dtype=np.float32), (32, 1))
    suv = np.zeros((32, 32), np.float32)
    suv[8:16, 8:16] = 4.0
    unit = lambda rgb: torch.from_numpy(np.moveaxis(rgb, -1, 0)[None].astype(np.float32) / 255)  # noqa: E731
    window = (500.0, 1000.0)
    fused = unit(render_fusion(t2, suv, t2_window=window))
    grey = unit(render_fusion(t2, np.zeros_like(suv), t2_window=window))
    pet = bc.pet_colour(fused, grey)[0]
    lo, hi = SUV_WINDOW
    expect = hot_colormap(np.float32((4.0 - lo) / (hi - lo))).mean()
    assert float(pet[10, 10]) == pytest.approx(float(expect), abs=2 / 255 / OPACITY)
    assert float(pet[20:, 20:].max()) == 0.0  # no PET, no colour, whatever the grey


def test_observer_scores_by_hand():
    pet = torch.zeros(2, 16, 16)
    spine = torch.zeros(2, 16, 16, dtype=torch.bool)
    spine[0, :10, :10] = True  # 100 spine pixels on slice 0 holding 0.00, 0.01, ..., 0.99
    pet[0, :10, :10] = torch.arange(100, dtype=torch.float32).reshape(10, 10) / 100
    pet[0, 12:, 12:] = 1.0  # hot, but outside the spine: not read
    s = bc.observer_scores(pet, spine)
    # numpy/torch linear quantile of 0..0.99: 0.99 * 99 / 100 = 0.9801; the median is the lower middle value, 0.49
    assert s["p99"] == pytest.approx(0.9801, abs=1e-6)
    assert s["contrast"] == pytest.approx(0.9801 - 0.49, abs=1e-6)
    assert s["peak"] == pytest.approx(0.9801, abs=1e-6)
    spine[1, :8, :8] = True  # a second slice of 64 pixels, all at 0.2: the pooled p99 falls, the peak stays
    pet[1, :8, :8] = 0.2
    s = bc.observer_scores(pet, spine)
    pooled = np.percentile(np.r_[np.arange(100) / 100, np.full(64, 0.2)], 99)
    assert s["p99"] == pytest.approx(pooled, abs=1e-6) and s["peak"] == pytest.approx(0.9801, abs=1e-6)
    assert bc.observer_scores(pet, torch.zeros_like(spine)) == {d: 0.0 for d in bc.OBSERVER_DESIGNS}


def test_roc_auc_threshold_sensitivity_specificity_by_hand():
    scores, labels = [0.9, 0.6, 0.4, 0.5, 0.4, 0.1], [True, True, True, False, False, False]
    # pairs won by the lesion studies: 3 + 3 + (1 + a tie at 0.4 counting half) = 7.5 of 9
    assert bc.roc_auc(scores, labels) == pytest.approx(7.5 / 9)
    assert bc.roc_auc(scores, [True] * 6) is None
    # cuts -0.9, 0.25, 0.45, 0.55, 0.75, 1.9 give sens + spec 1, 4/3, 4/3, 5/3, 4/3, 1
    assert bc.youden_threshold(scores, labels) == pytest.approx(0.55)
    assert bc.sens_spec(scores, labels, 0.55) == pytest.approx((2 / 3, 1.0))
    assert bc.sens_spec(scores, labels, 0.25) == pytest.approx((1.0, 1 / 3))
    assert bc.youden_threshold([0.2, 0.8], [False, True]) == pytest.approx(0.5)


def test_lesion_observer_chosen_on_validation_applied_unchanged():
    def study(lesion, real, model):
        return {"lesion": lesion, **{f"real_spine_{d}": v for d, v in zip(bc.OBSERVER_DESIGNS, real)},
                **{f"model_spine_{d}": v for d, v in zip(bc.OBSERVER_DESIGNS, model)},
                **{f"floor_spine_{d}": 0.0 for d in bc.OBSERVER_DESIGNS}}
    # designs p99, contrast, peak: "contrast" separates the real fusions perfectly, the others do not
    val = [study(True, (0.5, 0.30, 0.6), (0.6, 0.40, 0.6)), study(True, (0.3, 0.20, 0.4), (0.5, 0.35, 0.5)),
           study(False, (0.6, 0.10, 0.7), (0.5, 0.30, 0.5)), study(False, (0.2, 0.05, 0.2), (0.2, 0.10, 0.2))]
    figures, settings = bc.lesion_observer(val, chosen_on="of the test")
    assert settings["design"] == "contrast" and settings["real_auc_by_design"]["contrast"] == 1.0
    assert settings["threshold"] == pytest.approx(0.15)  # midway between 0.10 and 0.20
    assert settings["own_thresholds"]["model"] == pytest.approx(0.325)  # model contrast: 0.40 0.35 | 0.30 0.10
    assert "floor" not in settings["own_thresholds"] and "floor_lesion_auc" not in figures
    assert settings["chosen_on"] == "4 studies (2 with a lesion) of the test"
    # the model at the real fusions' threshold 0.15: both lesions, and one of two lesion-free studies, positive
    assert figures["model_lesion_sensitivity"] == 1.0 and figures["model_lesion_specificity"] == 0.5
    assert figures["model_lesion_specificity_own"] == 1.0
    # a cohort: the validation run's design and thresholds, not re-chosen
    cohort = [study(True, (0.9, 0.12, 0.9), (0.9, 0.33, 0.9)), study(False, (0.1, 0.16, 0.1), (0.1, 0.2, 0.1))]
    figures, again = bc.lesion_observer(cohort, settings)
    assert again["design"] == "contrast" and again["threshold"] == settings["threshold"]
    assert figures["real_lesion_auc"] == 0.0  # contrast reads the cohort's real fusions the wrong way round
    assert figures["real_lesion_sensitivity"] == 0.0 and figures["real_lesion_specificity"] == 0.0
    assert figures["model_lesion_sensitivity_own"] == 1.0 and figures["model_lesion_specificity_own"] == 1.0
