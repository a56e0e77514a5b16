"""Tiny end-to-end run: Pix2Pix then cDDPM training, resume, export, evaluation."""

import csv
import json

import numpy as np
import pytest
import torch

from dicomnode.infer.model import load_model, read_card


def write_dataset(root, n_patients=6, per_patient=4, size=64, seed=0):
    """The four files of the paired-dataset contract, with a learnable MR -> fusion mapping:
    a warm colour where the MR is bright, plus a red 'uptake' blob where the MR has a dark spot."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    mrs, fus, rows = [], [], []
    splits = ["train"] * (n_patients - 2) + ["val", "test"]
    for p in range(n_patients):
        for s in range(per_patient):
            cx, cy = rng.uniform(0.3, 0.7, 2)
            body = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.05)
            spot = np.exp(-((xx - cy) ** 2 + (yy - cx) ** 2) / 0.004)
            mr = np.clip(body - 0.8 * spot, 0, 1) * 2 - 1
            rgb = np.stack([0.8 * body + 0.2 * spot * 3, 0.8 * body, 0.6 * body * (1 - spot)], -1)
            mrs.append(mr[None].astype(np.float16))
            fus.append((np.clip(rgb, 0, 1) * 255).astype(np.uint8))
            rows.append({"index": len(rows), "patient_id": f"P{p}", "study_uid": f"1.2.{p}", "mr_series_uid": f"1.3.{p}",
                         "fusion_series_uid": f"1.4.{p}", "slice_index": s, "position_mm": s * 4.0,
                         "uptake": f"{rng.uniform(1, 9):.2f}" if s % 3 else "", "lesion": int(s % 3 > 0),
                         "split": splits[p]})
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "mr.npy", np.stack(mrs))
    np.save(root / "fusion.npy", np.stack(fus))
    with open(root / "pairs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    counts = {k: sum(r["split"] == k for r in rows) for k in ("train", "val", "test")}
    (root / "manifest.json").write_text(json.dumps({
        "format": "dicomnode-paired/1", "grid": size, "seed": seed, "source": "synthetic-test",
        "counts": {"pairs": len(rows), "patients": n_patients, **counts},
        "splits": {k: sorted({r["patient_id"] for r in rows if r["split"] == k}) for k in ("train", "val", "test")},
        "skipped": [], "created": "2026-01-01T00:00:00+00:00"}))
    return root


def _column(path, name):
    with open(path, newline="") as f:
        return [float(r[name]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("e2e")
    data = write_dataset(root / "data")
    from training import cddpm, pix2pix
    p2p = pix2pix.train(data, root / "p2p", preset="tiny", steps=30, batch_size=4, lr=2e-3, seed=0, device="cpu",
                        log_every=1, sample_every=30, ckpt_every=10, quiet=True)
    ddpm = cddpm.train(data, root / "p2p" / "checkpoint.pt", root / "ddpm", preset="tiny", steps=40, batch_size=4,
                       crop=32, lr=2e-3, decay_start=0.75, timesteps=50, seed=0, device="cpu", log_every=1,
                       sample_every=40, ckpt_every=20, sample_steps=3, sample_strength=0.5, quiet=True)
    return root, data, p2p, ddpm


def test_pix2pix_loss_decreases_and_artefacts(runs):
    root, _, p2p, _ = runs
    l1 = _column(root / "p2p" / "log.csv", "loss_l1")
    assert len(l1) == 30 and np.mean(l1[-5:]) < 0.7 * np.mean(l1[:5])
    assert (root / "p2p" / "loss.png").stat().st_size > 1000
    assert (root / "p2p" / "samples_000030.png").exists()
    assert p2p["steps"] == 30


def test_pix2pix_resume_continues_from_checkpoint(runs, tmp_path):
    root, data, _, _ = runs
    from training import pix2pix
    kw = dict(preset="tiny", batch_size=4, lr=2e-3, seed=0, device="cpu", log_every=1, sample_every=100,
              ckpt_every=5, quiet=True)
    pix2pix.train(data, tmp_path / "a", steps=20, stop_after=10, **kw)  # interrupted at 10
    state10 = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    assert state10["step"] == 10
    pix2pix.train(data, tmp_path / "a", steps=20, resume=True, **kw)  # resumes at 10, runs to 20
    log = _column(tmp_path / "a" / "log.csv", "step")
    assert log == list(range(1, 21))
    pix2pix.train(data, tmp_path / "b", steps=20, **kw)  # uninterrupted reference
    a = _column(tmp_path / "a" / "log.csv", "loss_l1")
    b = _column(tmp_path / "b" / "log.csv", "loss_l1")
    assert np.allclose(a, b, rtol=1e-3, atol=1e-5)


def test_cddpm_loss_decreases_and_exports_model(runs):
    root, _, _, ddpm = runs
    loss = _column(root / "ddpm" / "log.csv", "loss")
    assert np.mean(loss[-8:]) < 0.8 * np.mean(loss[:8])
    lr = _column(root / "ddpm" / "log.csv", "lr")  # warm-up, then linear decay to 0 from step 30
    assert lr[28] < lr[29] and lr[34] < lr[29] and lr[-1] == 0.0
    card = read_card(ddpm["model_dir"])
    assert card["training"]["cddpm"]["decay_start"] == 0.75
    assert card["training"]["cddpm"]["steps"] == 40 and card["training"]["data"]["counts"]["train"] == 16
    model = load_model(ddpm["model_dir"])
    out = model.translate(torch.zeros(1, 1, 64, 64), seed=1)
    assert out.rgb.shape == (1, 3, 64, 64)


def test_evaluate_writes_metrics_csv_figure_and_card(runs, capsys):
    root, data, _, ddpm = runs
    from training.evaluate import evaluate, report
    summary = evaluate(ddpm["model_dir"], data, root / "eval", split="test", full_subset=1, figure_cases=2,
                       figure_samples=2, device="cpu", update_card=True, command="pytest", quiet=True)
    for k in ("psnr", "ssim", "mae", "mse"):
        assert np.isfinite(summary[k]["mean"]) and summary[k]["sd"] >= 0
        assert np.isfinite(summary["ablation"]["cddpm_ddpm"][k]["mean"])
    assert 0 < summary["ssim"]["mean"] <= 1 and summary["n"] == 4
    assert "11x11 Gaussian" in summary["metric_definitions"]
    assert summary["ablation"]["network_evaluations"]["cddpm_ddpm"] == 50
    with open(root / "eval" / "per_case.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {"cddpm_ssim", "pix2pix_psnr", "uptake_tertile"} <= set(rows[0])
    assert sum(s["n"] for s in summary["uptake_tertiles"]["strata"]) == 4
    assert (root / "eval" / "comparison.png").stat().st_size > 1000
    card = read_card(ddpm["model_dir"])
    assert card["metrics"]["command"] == "pytest" and card["metrics"]["psnr"] == summary["psnr"]
    load_model(ddpm["model_dir"])  # the card update keeps the weights verifiable
    assert "SSIM" in report(summary)


def test_cli_evaluate_json(runs, capsys):
    root, data, _, ddpm = runs
    from training.__main__ import main
    assert main(["evaluate", "--model", ddpm["model_dir"], "--data", str(data), "--out", str(root / "cli"),
                 "--device", "cpu", "--full-subset", "0", "--steps", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"psnr", "ssim", "mae", "mse"} <= set(out)
    assert all(set(out[k]) == {"mean", "sd"} for k in ("psnr", "ssim", "mae", "mse"))
    assert out["pipeline"]["steps"] == 2 and out["ablation"]["n"] == 0


def test_lesion_weight_draws_lesion_studies_that_many_times_as_often():
    from training.trainutil import Split, batches, lesion_weights

    rows = [{"lesion": "1"}] * 10 + [{"lesion": "0"}] * 20 + [{"lesion": ""}] * 10  # "": not recorded
    split = Split("train", torch.zeros(40, 1, 2, 2), torch.zeros(40, 3, 2, 2), rows, {})
    assert lesion_weights(split, 1.0) is None  # plain shuffling, as before
    with pytest.raises(ValueError):
        lesion_weights(split, 0.0)
    it = batches(40, 4, torch.Generator().manual_seed(0), lesion_weights(split, 3.0))
    drawn = torch.cat([next(it) for _ in range(2500)])
    ratio = (drawn < 10).float().mean().item() / 10 / ((drawn >= 10).float().mean().item() / 30)
    assert 2.8 < ratio < 3.2  # per-pair rate of lesion pairs vs the others
    plain = batches(40, 4, torch.Generator().manual_seed(0))
    assert sorted(torch.cat([next(plain) for _ in range(10)]).tolist()) == list(range(40))  # one epoch, each once


def test_cpu_autocast_is_bf16_only_where_the_cpu_has_it():
    import torch

    from training.trainutil import autocast, cpu_bf16_native

    with autocast(torch.device("cpu"), amp=True):
        y = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))
    assert y.dtype == (torch.bfloat16 if cpu_bf16_native() else torch.float32)
    with autocast(torch.device("cpu"), amp=False):
        assert torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4)).dtype == torch.float32


def test_uptake_map_reads_the_pet_share_of_a_phantom_fusion():
    from dicomnode.tools.phantom import render_fusion
    from training.trainutil import uptake_map

    t2 = np.linspace(0, 1000, 64 * 64, dtype=np.float32).reshape(64, 64)
    suv = np.zeros((64, 64), np.float32)
    suv[10:20, 10:20], suv[40:50, 40:50] = 7.0, 2.0   # top of the window; marrow-like
    lo, hi = np.percentile(t2, [0.5, 99.5])
    fusion = render_fusion(t2, suv, t2_window=((lo + hi) / 2, hi - lo))
    mr = torch.from_numpy(np.clip((t2 - lo) / (hi - lo) * 2 - 1, -1, 1))[None, None]
    fus = torch.from_numpy(fusion.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    u = uptake_map(mr, fus)[0, 0]
    assert u[12:18, 12:18].min() > 0.97                           # SUV 7: white, u = 1
    assert 0.15 < u[42:48, 42:48].mean() < 0.35                   # SUV 2: hot(2/7) is dim red
    assert u[30:36, 0:8].max() < 0.02 and u[30:36, 56:64].max() < 0.02  # no uptake, dark or bright MR


def test_uptake_weighted_l1_weights_hot_pixels_that_much_more():
    from training.trainutil import uptake_weighted_l1

    mr = -torch.ones(1, 1, 4, 4)                     # black MR: the fusion is all PET
    real = -torch.ones(1, 3, 4, 4)
    real[..., 0, 0] = 1.0                            # one white pixel: u = 1
    pred = real.clone()
    pred[..., 0, 0] -= 0.5                           # an error only on the hot pixel ...
    hot_err = uptake_weighted_l1(pred, real, mr, 10.0)
    pred2 = real.clone()
    pred2[..., 3, 3] += 0.5                          # ... or the same error on a cold one
    cold_err = uptake_weighted_l1(pred2, real, mr, 10.0)
    assert hot_err.item() == pytest.approx(10 * cold_err.item())
    assert cold_err.item() == pytest.approx(0.5 / (15 + 10))   # normalised by the weights' sum
    plain = torch.nn.functional.l1_loss(pred, real)
    assert uptake_weighted_l1(pred, real, mr, 1.0).item() == pytest.approx(plain.item())
    with pytest.raises(ValueError):
        uptake_weighted_l1(pred, real, mr, 0.0)


def test_diffusion_loss_weights_each_pixel_by_what_it_is_given():
    from dicomnode.infer.diffusion import Diffusion
    from training.trainutil import uptake_weights

    diffusion = Diffusion("cosine", 20, "eps")
    x0 = torch.zeros(2, 3, 8, 8)
    cond = torch.zeros(2, 2, 8, 8)

    def model(x_t, t, c):  # x0 = 0, so the eps target is x_t / sqrt(1 - abar_t); off by 1 (left), 3 (right)
        target = x_t / (1 - diffusion.alphas_cumprod[t].float()).sqrt().view(-1, 1, 1, 1)
        return target + torch.cat([torch.ones(2, 3, 8, 4), 3 * torch.ones(2, 3, 8, 4)], -1)

    loss = lambda w: diffusion.loss(model, x0, cond, generator=torch.Generator().manual_seed(5), weight=w).item()  # noqa: E731
    assert loss(None) == pytest.approx(5.0)                      # (1 + 9) / 2
    assert loss(torch.ones(2, 1, 8, 8)) == pytest.approx(5.0)    # all-ones is the plain MSE
    right = torch.zeros(2, 1, 8, 8)
    right[..., 4:] = 1.0
    assert loss(right) == pytest.approx(9.0)                     # only the right half counts
    assert loss(1 + 3 * right) == pytest.approx((1 + 4 * 9) / 5)  # right half 4x: normalised by the weights

    mr = -torch.ones(1, 1, 4, 4)                                 # black MR: the fusion is all PET
    real = -torch.ones(1, 3, 4, 4)
    real[..., 0, 0] = 1.0                                        # one white pixel: u = 1
    w = uptake_weights(mr, real, 10.0)
    assert w.shape == (1, 1, 4, 4) and w[0, 0, 0, 0] == pytest.approx(10.0) and w[0, 0, 1:, 1:].eq(1).all()
    assert uptake_weights(mr, real, 1.0) is None
    with pytest.raises(ValueError):
        uptake_weights(mr, real, 0.0)


def test_cddpm_loss_weights_multiply_uptake_and_lesion_mask_weights():
    from training.cddpm import loss_weights

    mr = -torch.ones(1, 1, 4, 4)
    real = -torch.ones(1, 3, 4, 4)
    real[..., 0, 0] = 1.0                            # one white pixel: u = 1
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[..., :2, :2] = True                         # a lesion covering it and three cold pixels
    assert loss_weights(mr, real, 1.0, [], 1.0) is None and loss_weights(mr, real, 1.0, [mask], 1.0) is None
    w = loss_weights(mr, real, 1.0, [mask], 3.0)[0, 0]
    assert w[:2, :2].eq(3).all() and w[2:].eq(1).all() and w[:, 2:].eq(1).all()
    w = loss_weights(mr, real, 4.0, [mask], 3.0)[0, 0]
    assert w[0, 0] == pytest.approx(12.0) and w[1, 1] == pytest.approx(3.0) and w[3, 3] == pytest.approx(1.0)
    real[..., 3, 3] = 1.0                            # a second white pixel, outside the lesion
    w = loss_weights(mr, real, 1.0, [mask], 1.0, 5.0)[0, 0]  # uptake weighting inside the lesion only
    assert w[0, 0] == pytest.approx(5.0) and w[3, 3] == pytest.approx(1.0) and w[1, 1] == pytest.approx(1.0)


def test_mse_reconstruction_is_the_weighted_mean_square_and_l1_stays_the_default():
    from training.pix2pix import reconstruction_loss

    mr = -torch.ones(1, 1, 4, 4)
    real = -torch.ones(1, 3, 4, 4)
    fake = real.clone()
    fake[..., 1, 1] += 0.5
    assert reconstruction_loss(fake, real, mr).item() == pytest.approx(0.5 / 16)             # l1
    assert reconstruction_loss(fake, real, mr, "mse").item() == pytest.approx(0.25 / 16)     # mean square
    real_hot = real.clone()
    real_hot[..., 1, 1] = 1.0                                   # the erring pixel is white: u = 1
    fake_hot = real_hot.clone()
    fake_hot[..., 1, 1] -= 0.5
    assert reconstruction_loss(fake_hot, real_hot, mr, "mse", 5.0).item() == pytest.approx(5 * 0.25 / (15 + 5))


def test_pix2pix_records_its_loss_options_and_refuses_bad_ones(tmp_path):
    from training import pix2pix

    data = write_dataset(tmp_path / "data", n_patients=4, per_patient=2, size=32)
    res = pix2pix.train(data, tmp_path / "p", preset="tiny", steps=2, batch_size=2, device="cpu", quiet=True,
                        sample_every=100, recon="mse", gan_weight=0.0, uptake_weight=3.0)
    state = torch.load(tmp_path / "p" / "checkpoint.pt", weights_only=False)
    assert (state["recon"], state["gan_weight"], state["uptake_weight"]) == ("mse", 0.0, 3.0)
    assert (res["recon"], res["gan_weight"]) == ("mse", 0.0)
    with pytest.raises(ValueError, match="recon"):
        pix2pix.train(data, tmp_path / "q", preset="tiny", steps=1, device="cpu", quiet=True, recon="l2")
    with pytest.raises(ValueError, match="gan weight"):
        pix2pix.train(data, tmp_path / "q", preset="tiny", steps=1, device="cpu", quiet=True, gan_weight=-1)


def test_patient_folds_are_stable_and_partition_the_split(tmp_path):
    from training.trainutil import load_split, patient_fold

    assert [patient_fold(f"P{i}", 2) for i in range(4)] == [1, 0, 0, 1]  # a hash, not the run's state
    with pytest.raises(ValueError, match="folds"):
        patient_fold("P0", 0)
    split = load_split(write_dataset(tmp_path / "data", per_patient=2, size=32), "train")
    f0, f1 = split.fold_positions(2, 0), split.fold_positions(2, 1)
    assert sorted(f0 + f1) == list(range(len(split))) and f0 and f1
    sub = split.subset(f1)
    assert {r["patient_id"] for r in sub.rows} == {"P0", "P3"} and torch.equal(sub.mr, split.mr[f1])


def test_fold_generators_hold_out_their_fold_and_condition_the_cddpm_out_of_fold(tmp_path):
    from training import cddpm, pix2pix
    from training.trainutil import load_split

    data = write_dataset(tmp_path / "data", per_patient=2, size=32)
    kw = dict(preset="tiny", steps=2, batch_size=2, device="cpu", quiet=True, sample_every=100)
    ckpts = []
    for fold in (0, 1):
        res = pix2pix.train(data, tmp_path / f"f{fold}", folds=2, holdout_fold=fold, **kw)
        state = torch.load(tmp_path / f"f{fold}" / "checkpoint.pt", weights_only=False)
        assert (state["folds"], state["holdout_fold"]) == (2, fold)
        assert res["train_pairs"] == 4  # 2 of the 4 training patients, 2 slices each
        ckpts.append(tmp_path / f"f{fold}" / "checkpoint.pt")
    with pytest.raises(ValueError, match="holdout fold"):
        pix2pix.train(data, tmp_path / "bad", folds=2, holdout_fold=2, **kw)

    split = load_split(data, "train")
    oof = cddpm.out_of_fold_outputs(ckpts, split, "cpu")
    for fold, ckpt in enumerate(ckpts):  # every pair predicted by the generator that never saw its patient
        G, _, _ = pix2pix.load_generator(ckpt)
        rows = split.fold_positions(2, fold)
        assert torch.allclose(oof[rows], cddpm.pix2pix_outputs(G, split.mr[rows], "cpu"), atol=1e-6)
    own = cddpm.pix2pix_outputs(pix2pix.load_generator(ckpts[0])[0], split.mr, "cpu")
    assert not torch.allclose(oof, own)
    with pytest.raises(ValueError, match="one generator per held-out fold"):
        cddpm.out_of_fold_outputs([ckpts[0], ckpts[0]], split, "cpu")
    with pytest.raises(ValueError, match="one generator per held-out fold"):
        cddpm.out_of_fold_outputs([ckpts[1]], split, "cpu")

    res = cddpm.train(data, ckpts[0], tmp_path / "ddpm", preset="tiny", steps=2, batch_size=2, crop=16,
                      timesteps=20, device="cpu", quiet=True, sample_every=100, sample_steps=2,
                      pix2pix_folds=ckpts, uptake_weight=4.0)
    card = read_card(res["model_dir"])
    assert card["training"]["cddpm_condition"]["out_of_fold"] == [str(c) for c in ckpts]
    assert card["training"]["cddpm"]["uptake_weight"] == 4.0
    with pytest.raises(ValueError, match="phantom export"):
        cddpm.train(data, ckpts[0], tmp_path / "ddpm2", preset="tiny", steps=1, lesion_uptake_weight=3.0)
    with pytest.raises(ValueError, match="must be positive"):
        cddpm.train(data, ckpts[0], tmp_path / "ddpm2", preset="tiny", steps=1, uptake_weight=0.0)
