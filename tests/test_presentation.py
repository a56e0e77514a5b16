"""Finishing the model's output as a fusion of the input MR (dicomnode.infer.presentation)."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from dicomnode.infer.grid import normalize_series, rgb_to_unit
from dicomnode.infer.model import ModelError, load_model, read_card, write_card
from dicomnode.infer.presentation import OutputSpec, finish_fusion, gaussian_blur, project_hot_hull
from dicomnode.tools.fusion import hot_colormap, render_fusion
from tests.support.tinymodel import make_tiny_model

HOT = OutputSpec("hot", 0.5, 1.0)


def _brute_projection(p: np.ndarray, n: int = 41) -> np.ndarray:
    """Nearest point of a fine grid of {1 >= r >= g >= b >= 0}, refined by a local grid."""
    best = None
    for lo, hi, k in ((0.0, 1.0, n), (None, None, 41)):
        if lo is None:
            c = best
            axes = [np.linspace(max(v - 0.03, 0), min(v + 0.03, 1), k) for v in c]
        else:
            axes = [np.linspace(lo, hi, k)] * 3
        r, g, b = np.meshgrid(*axes, indexing="ij")
        pts = np.stack([r, g, b], -1).reshape(-1, 3)
        pts = pts[(pts[:, 0] >= pts[:, 1]) & (pts[:, 1] >= pts[:, 2])]
        best = pts[((pts - p) ** 2).sum(1).argmin()]
    return best


def test_hot_hull_projection_is_the_nearest_feasible_colour():
    rng = np.random.default_rng(0)
    pts = rng.uniform(-0.4, 1.4, (40, 3))
    got = project_hot_hull(torch.from_numpy(pts.T.reshape(1, 3, 40, 1).copy())).numpy().reshape(3, 40).T
    assert np.all(got[:, 0] >= got[:, 1]) and np.all(got[:, 1] >= got[:, 2])
    assert got.min() >= 0 and got.max() <= 1
    for p, q in zip(pts, got):
        ref = _brute_projection(p)
        assert ((q - p) ** 2).sum() <= ((ref - p) ** 2).sum() + 1e-6
        np.testing.assert_allclose(q, ref, atol=2e-3)


def test_hot_hull_projection_keeps_colours_the_map_can_make_and_never_moves_away_from_them():
    x = torch.linspace(0, 1, 50)
    hot = torch.from_numpy(hot_colormap(x.numpy())).T.reshape(1, 3, 50, 1)
    torch.testing.assert_close(project_hot_hull(hot), hot)
    # any real PET part lies in the hull, so the projection of a corrupted one is never further from it
    rng = np.random.default_rng(1)
    truth = torch.from_numpy(hot_colormap(rng.uniform(0, 1, (64, 64)))).permute(2, 0, 1)[None]
    noisy = truth + torch.from_numpy(rng.normal(0, 0.2, truth.shape)).float()
    before = ((noisy - truth) ** 2).sum(1)
    after = ((project_hot_hull(noisy) - truth) ** 2).sum(1)
    assert torch.all(after <= before + 1e-6) and after.mean() < 0.8 * before.mean()


def test_gaussian_blur_matches_scipy_and_keeps_constants():
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 1, (2, 3, 40, 50)).astype(np.float32)
    got = gaussian_blur(torch.from_numpy(x), 1.5).numpy()
    ref = ndimage.gaussian_filter(x, (0, 0, 1.5, 1.5), mode="mirror", truncate=3.0)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    const = torch.full((1, 3, 16, 16), 0.3)
    torch.testing.assert_close(gaussian_blur(const, 2.0), const)
    assert gaussian_blur(const, 0.0) is const


def _phantom_fusion(seed: int = 3):
    """A fusion rendered the way the phantom renders it (series percentile window) and the network's MR."""
    rng = np.random.default_rng(seed)
    mr = ndimage.gaussian_filter(rng.uniform(0, 2000, (2, 64, 64)), 2)
    suv = ndimage.gaussian_filter(rng.uniform(0, 3, (2, 64, 64)), 3)  # below SUV 2.6: the red segment
    suv[:, 20:30, 20:30] = 6.0  # and a lesion
    lo, hi = np.percentile(mr, [0.5, 99.5])
    rgb = np.stack([render_fusion(mr[k], suv[k], t2_window=((lo + hi) / 2, hi - lo)) for k in range(2)])
    return torch.from_numpy(rgb_to_unit(np.moveaxis(rgb, 0, -1).transpose(3, 0, 1, 2)).transpose(1, 0, 2, 3)), \
        torch.from_numpy(normalize_series(mr))[:, None]


def test_finishing_a_true_fusion_changes_it_only_by_the_smoothing():
    real, mr = _phantom_fusion()
    unchanged = finish_fusion(real, mr, OutputSpec("hot", 0.5, 0.0))
    assert (unchanged - real).abs().max() < 4 / 255  # uint8 rendering and the window's rounding
    # the grey part is taken from the MR, so a grey error in the prediction is cut where it leaves
    # the colours the map can make (here: a darker grey makes the blue channel negative), and no
    # pixel moves further from the truth
    spoiled = (real - 0.1).clamp(-1, 1)
    fixed = finish_fusion(spoiled, mr, OutputSpec("hot", 0.5, 0.0))
    before, after = ((spoiled - real) ** 2).sum(1), ((fixed - real) ** 2).sum(1)
    assert torch.all(after <= before + 1e-4) and after.mean() < 0.6 * before.mean()
    # smoothing acts on the PET part only: with no PET the fusion is the grey MR whatever the sigma
    grey_only = (1 - 0.5) * (mr + 1) / 2 * torch.ones(1, 3, 1, 1)
    torch.testing.assert_close(finish_fusion(grey_only * 2 - 1, mr, HOT), grey_only * 2 - 1, atol=1e-6, rtol=0)


def test_smoothing_removes_texture_the_mr_cannot_predict():
    real, mr = _phantom_fusion()
    grey = 0.5 * (mr + 1) / 2
    pet = ((real + 1) / 2 - grey) / 0.5
    texture = torch.from_numpy(np.random.default_rng(4).normal(0, 0.08, pet.shape)).float()
    pred = ((grey + 0.5 * (pet + texture)) * 2 - 1).clamp(-1, 1)
    err = lambda x: float(((x - real) ** 2).mean())  # noqa: E731
    assert err(finish_fusion(pred, mr, HOT)) < 0.5 * err(pred)


def test_pet_floor_clears_the_faint_haze_and_keeps_the_hot_colours():
    mr = torch.rand(1, 1, 32, 32) * 2 - 1
    grey = 0.5 * (mr + 1) / 2
    pet = torch.zeros(1, 3, 32, 32)  # left half: no uptake; right half: orange; a white lesion
    pet[:, :, :, 16:] = torch.tensor([1.0, 0.5, 0.0]).view(1, 3, 1, 1)
    pet[:, :, 8:12, 20:24] = 1.0
    real = (grey + 0.5 * pet) * 2 - 1
    haze = (grey + 0.5 * (pet + 0.02).clamp(max=1)) * 2 - 1  # faint uptake added everywhere
    spec = OutputSpec("hot", 0.5, 0.0, pet_floor=0.02)
    out = finish_fusion(haze, mr, spec)
    out_pet = ((out + 1) / 2 - grey) / 0.5
    assert float(out_pet[..., :16].abs().max()) < 1e-5  # the haze is gone
    assert float(out_pet[:, :, 8:12, 20:24].min()) > 1 - 1e-5  # white stays white
    torch.testing.assert_close(out_pet[:, :, 20:, 16:], pet[:, :, 20:, 16:], atol=0.011, rtol=0)
    r, g, b = out_pet.unbind(1)  # still a colour the map can make
    assert bool(((r >= g - 1e-6) & (g >= b - 1e-6) & (b >= -1e-6) & (r <= 1 + 1e-6)).all())
    assert float(((out - real) ** 2).mean()) < 0.1 * float(((haze - real) ** 2).mean())
    # floor 0 is the finish without a black level
    torch.testing.assert_close(finish_fusion(haze, mr, OutputSpec("hot", 0.5, 1.0, 0.0)), finish_fusion(haze, mr, HOT))


def test_output_spec_validates_the_card_block():
    assert OutputSpec.from_card({"colormap": "hot", "opacity": 0.5, "pet_sigma_px": 1, "selected_on": "x"}) == HOT
    assert OutputSpec.from_card({"colormap": "hot", "opacity": 0.5, "pet_sigma_px": 1, "pet_floor": 0.02}).pet_floor == 0.02
    for block, msg in (({"colormap": "jet", "opacity": 0.5, "pet_sigma_px": 1}, "colormap 'jet'"),
                       ({"colormap": "hot", "opacity": 0, "pet_sigma_px": 1}, "opacity"),
                       ({"colormap": "hot", "opacity": 0.5, "pet_sigma_px": -1}, "pet_sigma_px"),
                       ({"colormap": "hot", "opacity": 0.5, "pet_sigma_px": 1, "pet_floor": 0.5}, "pet_floor"),
                       ({"colormap": "hot", "opacity": 0.5}, "missing key 'pet_sigma_px'"),
                       ({"colormap": "hot", "opacity": 0.5, "pet_sigma_px": 1, "sigma": 2}, "unknown keys")):
        with pytest.raises(ValueError, match=msg):
            OutputSpec.from_card(block)


def test_model_applies_its_cards_output_block(tmp_path):
    path = make_tiny_model(tmp_path / "m")
    mr = torch.rand(2, 1, 64, 64) * 2 - 1
    raw = load_model(path).translate(mr, seed=1, samples=2)
    card = read_card(path)
    card["output"] = {"colormap": "hot", "opacity": 0.5, "pet_sigma_px": 1.0}
    write_card(path, card)
    model = load_model(path)
    out = model.translate(mr, seed=1, samples=2)
    torch.testing.assert_close(out.rgb, finish_fusion(raw.rgb, mr, HOT))
    torch.testing.assert_close(out.pix2pix, raw.pix2pix)  # the generator's own output stays raw
    torch.testing.assert_close(model.translate(mr, seed=1, samples=2, finish=False).rgb, raw.rgb)
    torch.testing.assert_close(model.translate(mr, refine=False).rgb, finish_fusion(raw.pix2pix, mr, HOT))
    card["output"]["opacity"] = 2
    write_card(path, card)
    with pytest.raises(ModelError, match="model.json: bad output block: opacity"):
        load_model(path)


def test_finish_picks_the_best_ssim_that_keeps_the_uptake():
    from training.finish import FinishScore, pick

    raw = FinishScore(None, None, 29.0, 0.908, 0.90)
    scores = [FinishScore(0.0, 0.0, 29.1, 0.910, 0.90), FinishScore(1.0, 0.0, 29.3, 0.913, 0.895),
              FinishScore(2.0, 0.0, 29.4, 0.914, 0.85)]  # 2.0: better image, but the lesion fades
    assert pick(raw, scores).sigma == 1.0
    assert pick(raw, scores, uptake_margin=0.1).sigma == 2.0
    assert pick(FinishScore(None, None, 29.0, 0.9, None), scores).sigma == 2.0  # no uptake to keep
    with pytest.raises(ValueError, match="every setting"):
        pick(FinishScore(None, None, 29.0, 0.9, 0.99), scores)
    # uptake painted beyond the real one may be taken back, down to all of it (less the margin)
    over = FinishScore(None, None, 29.0, 0.908, 1.05)
    floors = [FinishScore(1.0, 0.0, 29.3, 0.910, 1.04), FinishScore(1.0, 0.01, 29.4, 0.914, 0.995),
              FinishScore(1.0, 0.02, 29.4, 0.916, 0.985)]
    assert pick(over, floors).floor == 0.01


def test_finish_command_scores_the_sigmas_and_writes_the_card(tmp_path, capsys):
    import json

    from tests.test_training import write_dataset
    from training import finish

    data = write_dataset(tmp_path / "data", size=64)
    model = make_tiny_model(tmp_path / "m")
    out = tmp_path / "finish.json"
    assert finish.main(["--model", str(model), "--data", str(data), "--sigmas", "0,1,2", "--device", "cpu",
                        "--out", str(out), "--write"]) == 0
    res = json.loads(out.read_text())
    assert [(s["sigma"], s["floor"]) for s in res["scores"]] == [(sg, f) for sg in (0.0, 1.0, 2.0)
                                                                 for f in (0.0, 0.01, 0.02, 0.03)]
    assert res["pairs"] == 4 and "--write" not in res["command"]
    card = read_card(model)
    assert res["pick"] == {k: card["output"][k] for k in ("pet_sigma_px", "pet_floor")}
    assert card["output"]["opacity"] == 0.5
    assert "val split, 4 pairs" in card["output"]["selected_on"] and "<- pick" in capsys.readouterr().out
    load_model(model)  # the block it wrote is valid
    with pytest.raises(ValueError, match="pet_sigma_px"):
        finish.main(["--model", str(model), "--data", str(data), "--sigmas", "0,9"])
