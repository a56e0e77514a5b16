"""Pix2Pix training: U-Net generator vs 70x70 PatchGAN, LSGAN + 100 * L1 (Isola et al. 2017),
Adam 2e-4 (beta1 0.5), constant then linearly decaying learning rate, as in the paper's method.

    python -m training pix2pix --data DATA_DIR --out runs/p2p --preset small --steps 3000

Writes OUT/checkpoint.pt (resumable with --resume), OUT/log.csv, OUT/loss.png and
OUT/samples_STEP.png (MR | real fusion | Pix2Pix on validation slices).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dicomnode.infer.nets import build_discriminator, build_generator, channels_last, init_weights
from training import plots
from training.trainutil import (
    CsvLog,
    autocast,
    batches,
    init_from_model,
    lesion_weights,
    linear_decay,
    load_split,
    progress,
    resolve_device,
    save_checkpoint,
    seed_all,
    uptake_weighted_l1,
)

RECON_LOSSES = ("l1", "mse")

FIELDS = ["step", "epoch", "lr", "loss_d", "loss_g_gan", "loss_l1", "seconds"]


def train(data: str | Path, out: str | Path, *, preset: str = "small", steps: int = 3000, batch_size: int = 4,
          lr: float = 2e-4, beta1: float = 0.5, lambda_l1: float = 100.0, decay_start: float = 0.5,
          seed: int = 0, device: str = "auto", amp: bool = True, resume: bool = False,
          threads: int | None = None, log_every: int = 10, sample_every: int = 500, ckpt_every: int = 250,
          limit: int | None = None, quiet: bool = False, stop_after: int | None = None,
          lesion_weight: float = 1.0, uptake_weight: float = 1.0, recon: str = "l1", gan_weight: float = 1.0,
          snapshot_every: int | None = None, folds: int = 2, holdout_fold: int | None = None,
          init: str | Path | None = None) -> dict:
    """Train (or resume) a Pix2Pix generator; returns a summary with the final losses.
    `snapshot_every`: also keep OUT/snapshots/stepNNNNNN.pt every so many steps, to choose from
    with `python -m training select` (the lesion output swings between checkpoints).
    `folds`, `holdout_fold`: train without the patients of that fold (`patient_fold`), so its
    outputs on them are out-of-fold, as the shipped generator's are on a new patient
    (`python -m training cddpm --pix2pix-folds`). `init`: start the generator from a model
    folder's (its preset replaces `preset`); the discriminator starts fresh."""
    if threads:
        torch.set_num_threads(threads)
    if recon not in RECON_LOSSES:
        raise ValueError(f"recon must be one of {', '.join(RECON_LOSSES)}, got {recon!r}")
    if gan_weight < 0:
        raise ValueError(f"gan weight must be >= 0, got {gan_weight}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seed_all(seed)
    dev = resolve_device(device)
    train_set = load_split(data, "train", limit)
    if holdout_fold is not None:
        if not 0 <= holdout_fold < folds or folds < 2:
            raise ValueError(f"holdout fold must be in 0..folds-1 with folds >= 2, got {holdout_fold} of {folds}")
        held_out = set(train_set.fold_positions(folds, holdout_fold))
        keep = [i for i in range(len(train_set)) if i not in held_out]
        if not keep:
            raise ValueError(f"fold {holdout_fold} of {folds} holds every training patient")
        train_set = train_set.subset(keep)
    val_set = _preview_split(data)
    if init is not None:
        start, preset, _ = init_from_model(init, "pix2pix")
        G = channels_last(start, dev)
    else:
        G = channels_last(init_weights(build_generator(preset)), dev)
    D = channels_last(init_weights(build_discriminator(preset)), dev)
    opt_g = torch.optim.Adam(G.parameters(), lr=lr, betas=(beta1, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=lr, betas=(beta1, 0.999))
    sched = [torch.optim.lr_scheduler.LambdaLR(o, linear_decay(steps, decay_start)) for o in (opt_g, opt_d)]
    scaler = torch.amp.GradScaler("cuda", enabled=amp and dev.type == "cuda")
    gen = torch.Generator().manual_seed(seed)
    step = 0
    ckpt = out / "checkpoint.pt"
    if resume and ckpt.exists():
        state = torch.load(ckpt, map_location=dev, weights_only=False)
        G.load_state_dict(state["G"]), D.load_state_dict(state["D"])
        opt_g.load_state_dict(state["opt_g"]), opt_d.load_state_dict(state["opt_d"])
        for s, sd in zip(sched, state["sched"]):
            s.load_state_dict(sd)
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        step = state["step"]
    log = CsvLog(out / "log.csv", FIELDS, resume_step=step if resume else None)
    per_epoch = max(1, len(train_set) // batch_size)
    it = batches(len(train_set), batch_size, gen, lesion_weights(train_set, lesion_weight))
    for _ in range(step):  # replay the seeded batch order so a resumed run sees the same data
        next(it)
    G.train(), D.train()
    t0, last = time.time(), {}
    with progress(disable=quiet) as bar:
        task = bar.add_task("pix2pix", total=steps, completed=step, info="")
        end = min(steps, stop_after) if stop_after else steps  # stop_after: time-boxed chunk, resume later
        while step < end:
            idx = next(it)
            mr = train_set.mr[idx].to(dev).contiguous(memory_format=torch.channels_last)
            real = train_set.fusion[idx].to(dev).contiguous(memory_format=torch.channels_last)
            with autocast(dev, amp):
                fake = G(mr)
                # discriminator: LSGAN targets 1 (real) / 0 (fake)
                p_real, p_fake = D(mr, real), D(mr, fake.detach())
                loss_d = 0.5 * (F.mse_loss(p_real.float(), torch.ones_like(p_real, dtype=torch.float32))
                                + F.mse_loss(p_fake.float(), torch.zeros_like(p_fake, dtype=torch.float32)))
            opt_d.zero_grad(set_to_none=True)
            scaler.scale(loss_d).backward()
            scaler.step(opt_d)
            with autocast(dev, amp):
                p_fake = D(mr, fake)
                loss_gan = F.mse_loss(p_fake.float(), torch.ones_like(p_fake, dtype=torch.float32))
                loss_l1 = reconstruction_loss(fake, real, mr, recon, uptake_weight)
                loss_g = gan_weight * loss_gan + lambda_l1 * loss_l1
            opt_g.zero_grad(set_to_none=True)
            scaler.scale(loss_g).backward()
            scaler.step(opt_g)
            scaler.update()
            for s in sched:
                s.step()
            step += 1
            last = {"loss_d": loss_d.item(), "loss_g_gan": loss_gan.item(), "loss_l1": loss_l1.item()}
            if step % log_every == 0 or step == end:
                log.write(step=step, epoch=round(step / per_epoch, 3), lr=sched[0].get_last_lr()[0],
                          seconds=round(time.time() - t0, 1), **last)
            bar.update(task, completed=step, info=f"L1 {last['loss_l1']:.4f} D {last['loss_d']:.3f}")
            snapshot_now = snapshot_every is not None and snapshot_every > 0 and step % snapshot_every == 0 \
                and step < steps
            if step % ckpt_every == 0 or step == end or snapshot_now:
                save_checkpoint(ckpt, {"step": step, "preset": preset, "G": G.state_dict(), "D": D.state_dict(),
                                       "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
                                       "sched": [s.state_dict() for s in sched], "scaler": scaler.state_dict(),
                                       "rng": torch.get_rng_state(), "seed": seed,
                                       "data": str(data), "train_pairs": len(train_set), "batch_size": batch_size,
                                       "lesion_weight": lesion_weight, "uptake_weight": uptake_weight,
                                       "recon": recon, "gan_weight": gan_weight,
                                       "folds": folds if holdout_fold is not None else 1,
                                       "holdout_fold": holdout_fold, "lr": lr,
                                       "init": str(init) if init is not None else None})
            if snapshot_now:
                _snapshot(ckpt, step)
            if step % sample_every == 0 or step == steps:
                sample_grid(G, val_set, out / f"samples_{step:06d}.png", dev)
                G.train()
    if step == steps:
        recalibrate_bn(G, train_set.mr, batch_size, dev)
        state = torch.load(ckpt, map_location=dev, weights_only=False)
        state.update(G=G.state_dict(), bn_recalibrated=True)
        save_checkpoint(ckpt, state)
        if snapshot_every:
            _snapshot(ckpt, step)
        sample_grid(G, val_set, out / f"samples_{step:06d}.png", dev)
    plots.loss_curves(out / "log.csv", out / "loss.png", ["loss_l1", "loss_d", "loss_g_gan"], title="Pix2Pix losses")
    return {"steps": step, "train_pairs": len(train_set), "epochs": round(step / per_epoch, 2), **last,
            "lesion_weight": lesion_weight, "uptake_weight": uptake_weight, "recon": recon, "gan_weight": gan_weight,
            "checkpoint": str(ckpt)}


def reconstruction_loss(fake: torch.Tensor, real: torch.Tensor, mr: torch.Tensor, kind: str = "l1",
                        uptake_weight: float = 1.0) -> torch.Tensor:
    """The pixel term next to the adversarial one. "l1" (Pix2Pix) pulls each pixel to the median of
    what the MR allows; "mse" pulls it to the mean, which is what the MR-only bound is (and the
    hidden uptake's mean sits above its median). Both with the same uptake weighting."""
    if kind == "mse":
        return uptake_weighted_l1((fake.float() - real.float()) ** 2, torch.zeros_like(real, dtype=torch.float32),
                                  mr, uptake_weight, weights_from=real)
    return uptake_weighted_l1(fake, real, mr, uptake_weight)


def _snapshot(ckpt: Path, step: int) -> Path:
    """Copy the checkpoint just written to snapshots/stepNNNNNN.pt next to it."""
    dest = ckpt.parent / "snapshots" / f"step{step:06d}.pt"
    dest.parent.mkdir(exist_ok=True)
    shutil.copyfile(ckpt, dest)
    return dest


@torch.no_grad()
def recalibrate_bn(G, mr: torch.Tensor, batch_size: int, dev):
    """Replace the BatchNorm running statistics by exact averages over the training slices, so
    eval-mode inference (running stats) matches what the generator saw during training."""
    bns = [m for m in G.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    G.train()
    for i in range(0, len(mr) - batch_size + 1 if len(mr) >= batch_size else 1, batch_size):
        G(mr[i:i + batch_size].to(dev).contiguous(memory_format=torch.channels_last))
    for m in bns:
        m.momentum = 0.1
    G.eval()


def _preview_split(data):
    try:
        return load_split(data, "val", limit=4)
    except ValueError:
        return load_split(data, "train", limit=4)


@torch.no_grad()
def sample_grid(G, split, path: Path, dev):
    G.eval()
    fake = G(split.mr.to(dev)).float().cpu()
    rows = [[m.numpy(), r.numpy(), f.numpy()] for m, r, f in zip(split.mr, split.fusion, fake)]
    plots.save_grid(rows, path, ["MR", "real", "pix2pix"])


def load_generator(checkpoint: str | Path, device="cpu"):
    """(generator in eval mode, preset, checkpoint dict) from a Pix2Pix checkpoint."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    G = build_generator(state["preset"])
    G.load_state_dict(state["G"])
    return channels_last(G, device).eval(), state["preset"], state


def main(argv=None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m training pix2pix", description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="paired data set directory (build-dataset output)")
    ap.add_argument("--out", required=True, help="run directory: checkpoint.pt, log.csv, loss.png, samples_*.png")
    ap.add_argument("--preset", default="small", help="unet_256 (paper), small (shipped), tiny")
    ap.add_argument("--steps", type=int, default=3000, help="optimiser steps in total")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--lambda-l1", type=float, default=100.0, help="weight of the L1 term (paper: 100)")
    ap.add_argument("--decay-start", type=float, default=0.5, help="fraction of steps before the linear LR decay")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    ap.add_argument("--no-amp", action="store_true", help="fp32 only (default: fp16 on CUDA, bf16 on a CPU with native bf16)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    ap.add_argument("--stop-after", type=int, help="stop at this step (continue later with --resume)")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--sample-every", type=int, default=500)
    ap.add_argument("--snapshot-every", type=int, help="keep OUT/snapshots/stepNNNNNN.pt this often (training select)")
    ap.add_argument("--limit", type=int, help="use at most this many training pairs")
    ap.add_argument("--lesion-weight", type=float, default=1.0,
                    help="draw pairs of studies with a lesion this many times as often (pairs.csv lesion=1)")
    ap.add_argument("--recon", choices=RECON_LOSSES, default="l1", help="pixel loss: l1 (paper) or mse")
    ap.add_argument("--gan-weight", type=float, default=1.0, help="weight of the LSGAN term (paper: 1; 0: none)")
    ap.add_argument("--uptake-weight", type=float, default=1.0,
                    help="weight of the hottest pixels in the L1 term, 1 + (W-1) u^2 with u the PET share (1: plain L1)")
    ap.add_argument("--folds", type=int, default=2, help="number of patient folds for --holdout-fold")
    ap.add_argument("--holdout-fold", type=int,
                    help="train without this fold's patients (a fold generator for cddpm --pix2pix-folds)")
    ap.add_argument("--init", metavar="MODEL", help="start from this model folder's generator (fine-tuning)")
    a = ap.parse_args(argv)
    res = train(a.data, a.out, preset=a.preset, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                lambda_l1=a.lambda_l1, decay_start=a.decay_start, seed=a.seed, device=a.device, amp=not a.no_amp,
                resume=a.resume, stop_after=a.stop_after, threads=a.threads, sample_every=a.sample_every,
                limit=a.limit, lesion_weight=a.lesion_weight,
                uptake_weight=a.uptake_weight, recon=a.recon, gan_weight=a.gan_weight,
                snapshot_every=a.snapshot_every, folds=a.folds, holdout_fold=a.holdout_fold, init=a.init)
    print(json.dumps(res))
    return 0
