"""Checkpoint selection on the validation split: pix2pix --snapshot-every and python -m training select."""

import json

import pytest
import torch

from tests.test_training import write_dataset
from training import select
from training.trainutil import Split


def _fusion(mr: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A fusion in [-1, 1] whose PET colour (trainutil.uptake_map) is exactly u: rgb = grey/2 + u/2."""
    rgb01 = 0.5 * (mr + 1) / 2 + 0.5 * u
    return (rgb01 * 2 - 1).expand(-1, 3, -1, -1).clone()


def test_uptake_shown_is_the_share_of_the_pet_colour_painted_inside_the_mask():
    torch.manual_seed(0)
    mr = torch.rand(2, 1, 16, 16) * 2 - 1
    u = torch.zeros(2, 1, 16, 16)
    u[:, :, 4:8, 4:8] = 0.8            # a hot spot
    u[:, :, 10:, 10:] = 0.3            # faint uptake: below the hot threshold, not counted
    real = _fusion(mr, u)
    shown, total = select.uptake_sums(mr, real, real)
    assert shown / total == pytest.approx(1.0)
    assert total == pytest.approx(2 * 16 * 0.8, rel=1e-5)
    half = _fusion(mr, u / 2)
    assert select.uptake_sums(mr, real, half)[0] / total == pytest.approx(0.5, rel=1e-5)
    no_pet = _fusion(mr, torch.zeros_like(u))
    assert select.uptake_sums(mr, real, no_pet)[0] == pytest.approx(0.0, abs=1e-4)
    # painting the faint region hotter does not count: only the real hot pixels are scored
    wrong_place = _fusion(mr, torch.where(u > 0.5, 0.0, 0.9))
    assert select.uptake_sums(mr, real, wrong_place)[0] / total == pytest.approx(0.0, abs=1e-4)
    # an explicit mask (the lesion) replaces the hot pixels
    lesion = torch.zeros_like(u, dtype=torch.bool)
    lesion[:, :, 10:, 10:] = True
    shown, total = select.uptake_sums(mr, real, wrong_place, lesion)
    assert total == pytest.approx(2 * 36 * 0.3, rel=1e-5) and shown / total == pytest.approx(3.0, rel=1e-5)


def test_lesion_rows_are_the_labelled_studies_or_every_pair():
    mk = lambda flags: Split("val", torch.zeros(len(flags), 1, 2, 2), torch.zeros(len(flags), 3, 2, 2),  # noqa: E731
                             [{"lesion": f} for f in flags], {})
    assert select.lesion_study_rows(mk(["1", "0", "", "1"])).tolist() == [True, False, False, True]
    assert select.lesion_study_rows(mk(["", "", "0"])).tolist() == [True, True, True]


def _score(name, ssim, shown):
    return select.Score(name, None, 28.0, ssim, shown, 100, False)


def test_pick_takes_the_most_uptake_among_checkpoints_near_the_best_ssim():
    scores = [_score("a", 0.82, 0.70), _score("b", 0.815, 0.90), _score("c", 0.75, 0.99)]
    assert select.pick(scores, ssim_margin=0.01).checkpoint == "b"   # c smears colour: SSIM too low
    assert select.pick(scores, ssim_margin=0.001).checkpoint == "a"
    assert select.pick(scores, ssim_margin=0.1).checkpoint == "c"
    assert select.pick([_score("x", 0.8, None), _score("y", 0.81, None)]).checkpoint == "y"
    with pytest.raises(ValueError, match="no checkpoints"):
        select.pick([])


def test_snapshots_are_kept_and_scored_on_the_validation_split(tmp_path, capsys):
    torch.set_num_threads(2)
    from training import pix2pix

    data = write_dataset(tmp_path / "data", size=32)
    pix2pix.train(data, tmp_path / "p2p", preset="tiny", steps=20, batch_size=4, lr=2e-3, seed=0, device="cpu",
                  sample_every=100, ckpt_every=7, snapshot_every=10, quiet=True)
    snaps = sorted((tmp_path / "p2p" / "snapshots").glob("*.pt"))
    assert [p.name for p in snaps] == ["step000010.pt", "step000020.pt"]
    assert torch.load(snaps[0], weights_only=False)["step"] == 10
    assert torch.load(snaps[1], weights_only=False)["bn_recalibrated"] is True

    out = tmp_path / "select.json"
    pick = tmp_path / "pick.pt"
    assert select.main(["--data", str(data), *map(str, snaps), "--device", "cpu", "--out", str(out),
                        "--save-pick", str(pick)]) == 0
    res = json.loads(out.read_text())
    by_step = {s["step"]: s for s in res["scores"]}
    assert by_step[10]["recalibrated"] is True and by_step[20]["recalibrated"] is False
    assert res["pick"] in {s["checkpoint"] for s in res["scores"]}
    for s in res["scores"]:
        assert s["mask_pixels"] > 0 and 0 <= s["uptake_shown"] < 3
        assert 0 < s["ssim"] <= 1 and s["psnr"] > 5
    assert "pick:" in capsys.readouterr().out
    saved = torch.load(pick, weights_only=False)
    assert saved["bn_recalibrated"] is True and saved["selected_from"] == res["pick"]
    assert "D" not in saved and "opt_g" not in saved
    G = pix2pix.load_generator(pick)[0]    # what cddpm --pix2pix loads
    assert G(torch.zeros(1, 1, 32, 32)).shape == (1, 3, 32, 32)


def test_phantom_lesion_masks_fall_on_the_lesion_of_each_pair(tmp_path):
    """The re-simulated masks line up with the data set's pairs: inside them the real fusion is
    hot, and only pairs of lesion studies, at the lesion's slices, have any."""
    from dicomnode.tools.phantom import generate
    from training.data import build_dataset
    from training.trainutil import load_split, uptake_map

    export = tmp_path / "phantom"
    generate(export, 8, seed=5, lesion_fraction=0.5, min_matrix=64, max_matrix=96, min_slices=3, max_slices=4)
    data = tmp_path / "data"
    build_dataset(export, data, seed=0)
    parts = [load_split(data, name) for name in ("train", "val", "test")]
    split = Split("all", torch.cat([p.mr for p in parts]), torch.cat([p.fusion for p in parts]),
                  sum((p.rows for p in parts), []), {})
    masks = select.phantom_lesion_masks(export, split)
    lesion_rows = torch.tensor([r["lesion"] == "1" for r in split.rows])
    has = masks.flatten(1).any(1)
    assert has.any() and not has[~lesion_rows].any()
    u = uptake_map(split.mr, split.fusion)
    inside, outside = u[masks].mean(), u[~masks & lesion_rows[:, None, None, None].expand_as(masks)].mean()
    shifted = u[masks.roll(12, -1)].mean()   # the same masks 12 grid pixels off (~4 mm here)
    assert inside > 2.5 * outside and inside > shifted + 0.1   # measured 0.43 vs 0.11 and 0.27
    # the cDDPM can weight its loss inside these masks (training.cddpm.loss_weights)
    from dicomnode.infer.model import read_card
    from training import cddpm, pix2pix
    kw = dict(preset="tiny", batch_size=2, device="cpu", quiet=True, sample_every=100)
    pix2pix.train(data, tmp_path / "p2p", steps=1, **kw)
    res = cddpm.train(data, tmp_path / "p2p" / "checkpoint.pt", tmp_path / "ddpm", steps=2, crop=32, timesteps=20,
                      sample_steps=2, lesion_mask_weight=3.0, phantom=export, **kw)
    assert read_card(res["model_dir"])["training"]["cddpm"]["lesion_mask_weight"] == 3.0
    # a data set from other generator options is refused, not silently mis-masked
    info = json.loads((export / "cases.json").read_text())
    info["plan"]["max_slices"] = 9
    (export / "cases.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="does not re-plan"):
        select.phantom_lesion_masks(export, split)
    with pytest.raises(ValueError, match="does not re-plan"):
        cddpm.train(data, tmp_path / "p2p" / "checkpoint.pt", tmp_path / "ddpm2", steps=1, crop=32, timesteps=20,
                    lesion_mask_weight=3.0, phantom=export, **kw)
