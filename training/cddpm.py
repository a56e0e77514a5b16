"""cDDPM training: a diffusion U-Net that refines the Pix2Pix output, conditioned by channel
concatenation of the T2FS slice and the (frozen) Pix2Pix prediction, as in Jung et al. Trained on
random crops (the network is fully convolutional), EMA weights are the ones exported.

    python -m training cddpm --data DATA_DIR --pix2pix runs/p2p/checkpoint.pt --out runs/ddpm

Writes OUT/checkpoint.pt (resumable), OUT/log.csv, OUT/loss.png, OUT/samples_STEP.png
(MR | real | Pix2Pix | cDDPM fast sampler) and, at the end, the model directory OUT/model
(model.json + safetensors), ready for `python -m training evaluate --model OUT/model`.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import cast

import torch

from dicomnode.infer.diffusion import Diffusion
from dicomnode.infer.model import save_model, write_card
from dicomnode.infer.nets import DiffusionUNet, build_denoiser, channels_last
from training import plots
from training.pix2pix import _preview_split, load_generator
from training.select import phantom_lesion_masks
from training.trainutil import (
    EMA,
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
    uptake_weights,
)

FIELDS = ["step", "epoch", "lr", "loss", "loss_ema", "seconds"]


@torch.no_grad()
def pix2pix_outputs(G, mr: torch.Tensor, dev, batch_size: int = 8) -> torch.Tensor:
    """The frozen generator's predictions for every slice (the cDDPM's second condition)."""
    outs = [G(mr[i:i + batch_size].to(dev).contiguous(memory_format=torch.channels_last)).float().cpu()
            for i in range(0, len(mr), batch_size)]
    return torch.cat(outs).clamp(-1, 1)


def out_of_fold_outputs(checkpoints: list[str | Path], split, dev) -> torch.Tensor:
    """Each pair's prediction by the fold generator that did not see its patient
    (`pix2pix --folds N --holdout-fold K`, one checkpoint per fold). Trained on these, the cDDPM
    learns how far to trust the generator where the MR cannot tell (a hot or faint heart, a
    lesion's SUV) as it is on a new patient, instead of on patients the generator memorised."""
    states = [torch.load(c, map_location="cpu", weights_only=False) for c in checkpoints]
    folds = {int(s.get("folds") or 1) for s in states}
    held_out = sorted(s.get("holdout_fold") for s in states if s.get("holdout_fold") is not None)
    if folds != {len(checkpoints)} or held_out != list(range(len(checkpoints))):
        found = ", ".join(f"{c}: fold {s.get('holdout_fold')} of {s.get('folds')}" for c, s in zip(checkpoints, states))
        raise ValueError(f"--pix2pix-folds needs one generator per held-out fold 0..N-1 of N folds; got {found}")
    out = torch.empty_like(split.fusion)
    for path, state in zip(checkpoints, states):
        rows = split.fold_positions(len(checkpoints), int(state["holdout_fold"]))
        if rows:
            G, _, _ = load_generator(path, dev)
            out[rows] = pix2pix_outputs(G, split.mr[rows], dev)
    return out


def random_crops(tensors: list[torch.Tensor], size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """The same random size x size window from each tensor, independently per sample."""
    n, _, h, w = tensors[0].shape
    if size >= h and size >= w:
        return tensors
    ys = torch.randint(0, h - size + 1, (n,), generator=gen).tolist()
    xs = torch.randint(0, w - size + 1, (n,), generator=gen).tolist()
    return [torch.stack([t[i, :, y:y + size, x:x + size] for i, (y, x) in enumerate(zip(ys, xs))]) for t in tensors]


def loss_weights(mr: torch.Tensor, fusion: torch.Tensor, uptake_weight: float, mask: list[torch.Tensor],
                 lesion_mask_weight: float = 1.0, lesion_uptake_weight: float = 1.0) -> torch.Tensor | None:
    """Per-pixel diffusion-loss weights (N,1,H,W): the uptake weights everywhere, times, inside the
    lesion mask (`mask`: [] or [the cropped masks]), lesion_mask_weight and the uptake weights of
    `lesion_uptake_weight`; None when all are 1."""
    w = uptake_weights(mr, fusion, uptake_weight)
    if mask and (lesion_mask_weight != 1.0 or lesion_uptake_weight != 1.0):
        hot = uptake_weights(mr, fusion, lesion_uptake_weight) if lesion_uptake_weight != 1.0 else None
        inside = lesion_mask_weight * (hot if hot is not None else torch.ones_like(mask[0], dtype=torch.float32))
        m = torch.where(mask[0], inside, torch.ones_like(inside))
        w = m if w is None else w * m
    return w


def train(data: str | Path, pix2pix: str | Path, out: str | Path, *, preset: str = "small", steps: int = 4000,
          batch_size: int = 8, crop: int = 128, lr: float = 2e-4, decay_start: float = 1.0, ema_decay: float = 0.999,
          schedule: str = "cosine", prediction: str = "v", timesteps: int = 1000, seed: int = 0,
          device: str = "auto", amp: bool = True, resume: bool = False, threads: int | None = None,
          log_every: int = 10, sample_every: int = 500, ckpt_every: int = 250, limit: int | None = None,
          sample_steps: int = 8, sample_strength: float = 0.5, quiet: bool = False, stop_after: int | None = None,
          name: str = "t2fs2petfusion", version: str | None = None, lesion_weight: float = 1.0,
          pix2pix_folds: list[str | Path] | None = None, uptake_weight: float = 1.0,
          lesion_mask_weight: float = 1.0, lesion_uptake_weight: float = 1.0,
          phantom: str | Path | None = None, init: str | Path | None = None) -> dict:
    """Train (or resume) the cDDPM and export OUT/model; returns a summary. `pix2pix_folds`:
    condition on out-of-fold generator outputs (`out_of_fold_outputs`) instead of `pix2pix`'s own;
    `pix2pix` is still the generator exported with the model. `uptake_weight`: the loss on hot
    pixels of the real fusion weighted up (`trainutil.uptake_weights`); it moves the estimate there
    towards hot. `lesion_mask_weight`: the loss inside the lesion masks of the `phantom` export the
    data set was built from weighted up; the mask is visible in the MR, so this spends more of the
    network on lesions without moving the estimate. `lesion_uptake_weight`: the uptake weighting
    inside the lesion masks only, which moves the lesion's estimate towards hot and nothing else.
    `init`: start the denoiser (and its EMA) from a model folder's; its preset and diffusion
    (schedule, prediction, timesteps) replace `preset`, `schedule`, `prediction`, `timesteps`, and
    its card's sampler and output finish carry over to the new card."""
    if min(uptake_weight, lesion_mask_weight, lesion_uptake_weight) <= 0:
        raise ValueError(f"loss weights must be positive, got uptake {uptake_weight}, lesion mask "
                         f"{lesion_mask_weight}, lesion uptake {lesion_uptake_weight}")
    in_lesions = lesion_mask_weight != 1.0 or lesion_uptake_weight != 1.0
    if in_lesions and phantom is None:
        raise ValueError("lesion mask and lesion uptake weights need the phantom export the data set was built "
                         "from (phantom=), for its lesion masks")
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seed_all(seed)
    dev = resolve_device(device)
    G, p2p_preset, p2p_state = load_generator(pix2pix, dev)
    train_set = load_split(data, "train", limit)
    preview = _preview_split(data)
    masks = phantom_lesion_masks(phantom, train_set) if in_lesions and phantom is not None else None
    cond_p2p = (out_of_fold_outputs(pix2pix_folds, train_set, dev) if pix2pix_folds
                else pix2pix_outputs(G, train_set.mr, dev))
    preview_p2p = pix2pix_outputs(G, preview.mr, dev)
    start_card: dict | None = None
    if init is not None:
        start, preset, start_card = init_from_model(init, "cddpm")
        d = start_card["architecture"]["cddpm"]["diffusion"]
        schedule, timesteps, prediction = d["schedule"], int(d["timesteps"]), d["prediction"]
        net = channels_last(cast(DiffusionUNet, start), dev)
    else:
        net = channels_last(build_denoiser(preset), dev)
    diffusion = Diffusion(schedule, timesteps, prediction)
    ema = EMA(net, ema_decay)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    decay = linear_decay(steps, decay_start)  # 1.0 (default): constant after the warm-up
    # short warm-up (Adam is jumpy at the start), then constant, then optionally linear decay to 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * decay(s))
    scaler = torch.amp.GradScaler("cuda", enabled=amp and dev.type == "cuda")
    step, ckpt = 0, out / "checkpoint.pt"
    if resume and ckpt.exists():
        state = torch.load(ckpt, map_location=dev, weights_only=False)
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        scaler.load_state_dict(state["scaler"])
        step = state["step"]
    log = CsvLog(out / "log.csv", FIELDS, resume_step=step if resume else None)
    per_epoch = max(1, len(train_set) // batch_size)
    it = batches(len(train_set), batch_size, torch.Generator().manual_seed(seed),
                 lesion_weights(train_set, lesion_weight))
    for _ in range(step):
        next(it)
    net.train()
    t0, loss_ema, loss_v = time.time(), None, float("nan")
    with progress(disable=quiet) as bar:
        task = bar.add_task("cddpm", total=steps, completed=step, info="")
        end = min(steps, stop_after) if stop_after else steps  # stop_after: time-boxed chunk, resume later
        while step < end:
            idx = next(it)
            # crops, timesteps and noise come from a per-step seed, so a resumed run replays them exactly
            step_gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
            fusion, mr, p2p, *mask = random_crops([train_set.fusion[idx], train_set.mr[idx], cond_p2p[idx]]
                                                  + ([masks[idx]] if masks is not None else []), crop, step_gen)
            x0 = fusion.to(dev).contiguous(memory_format=torch.channels_last)
            cond = torch.cat([mr, p2p], 1).to(dev).contiguous(memory_format=torch.channels_last)
            with autocast(dev, amp):
                loss = diffusion.loss(net, x0, cond, generator=step_gen,
                                      weight=loss_weights(mr, fusion, uptake_weight, mask, lesion_mask_weight,
                                                         lesion_uptake_weight))
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
            sched.step()
            ema.update(net)
            step += 1
            loss_v = loss.item()
            loss_ema = loss_v if loss_ema is None else 0.98 * loss_ema + 0.02 * loss_v
            if step % log_every == 0 or step == end:
                log.write(step=step, epoch=round(step / per_epoch, 3), lr=sched.get_last_lr()[0], loss=loss_v,
                          loss_ema=loss_ema, seconds=round(time.time() - t0, 1))
            bar.update(task, completed=step, info=f"loss {loss_ema:.4f}")
            if step % ckpt_every == 0 or step == end:
                save_checkpoint(ckpt, {"step": step, "preset": preset, "net": net.state_dict(), "ema": ema.state_dict(),
                                       "opt": opt.state_dict(), "sched": sched.state_dict(),
                                       "scaler": scaler.state_dict(), "diffusion": diffusion.config(), "seed": seed})
            if step % sample_every == 0 or step == steps:
                sample_grid(ema.model, diffusion, preview, preview_p2p, out / f"samples_{step:06d}.png", dev,
                            sample_steps, sample_strength)
    if not (out / f"samples_{step:06d}.png").exists():
        sample_grid(ema.model, diffusion, preview, preview_p2p, out / f"samples_{step:06d}.png", dev,
                    sample_steps, sample_strength)
    if loss_ema is None:  # resumed at the end: report the logged value
        with open(out / "log.csv", newline="") as f:
            last = list(csv.DictReader(f))[-1:]
        loss_ema = float(last[0]["loss_ema"]) if last else None
    plots.loss_curves(out / "log.csv", out / "loss.png", ["loss"], title=f"cDDPM {prediction}-prediction loss")
    manifest = train_set.manifest
    card = save_model(out / "model", G.cpu(), ema.model.cpu(), pix2pix_preset=p2p_preset, cddpm_preset=preset,
                      diffusion=diffusion, name=name, version=version,
                      sampler=_sampler(start_card, sample_steps, sample_strength),
                      training={
                          "data": {"format": manifest.get("format"), "source": manifest.get("source"),
                                   "seed": manifest.get("seed"), "counts": manifest.get("counts"),
                                   "train_pairs_used": len(train_set), "split": "train"},
                          "pix2pix": {"checkpoint": str(pix2pix), "steps": p2p_state["step"],
                                      "batch_size": p2p_state.get("batch_size"), "seed": p2p_state.get("seed"),
                                      "lesion_weight": p2p_state.get("lesion_weight", 1.0),
                                      "loss": "LSGAN + 100*L1", "optimizer": "Adam 2e-4 beta1 0.5, linear decay"},
                          **({"cddpm_condition": {"out_of_fold": [str(c) for c in pix2pix_folds]}} if pix2pix_folds else {}),
                          "cddpm": {"steps": step, "batch_size": batch_size, "crop": crop, "lr": lr,
                                    "decay_start": decay_start, "ema_decay": ema_decay, "seed": seed,
                                    "lesion_weight": lesion_weight, "uptake_weight": uptake_weight,
                                    "lesion_mask_weight": lesion_mask_weight,
                                    "lesion_uptake_weight": lesion_uptake_weight,
                                    "final_loss_ema": loss_ema, "init": str(init) if init is not None else None},
                          **({"starting_model": start_card.get("version")} if start_card else {}),
                          "device": str(dev)})
    if start_card is not None and "output" in start_card:  # the finish chosen for the starting model
        card["output"] = dict(start_card["output"], selected_on=f"carried over from {start_card.get('version')}")
        write_card(out / "model", card)
    return {"steps": step, "train_pairs": len(train_set), "loss": loss_v, "loss_ema": loss_ema,
            "model_dir": str(out / "model"), "version": card["version"]}


def _sampler(start_card: dict | None, steps: int, strength: float) -> dict:
    """The card's sampler: the starting model's when fine-tuning, else the options'."""
    if start_card is not None and "sampler" in start_card:
        return {k: v for k, v in start_card["sampler"].items() if k != "selected_on"}
    return {"sampler": "ddim", "steps": steps, "strength": strength, "samples": 1}


@torch.no_grad()
def sample_grid(net, diffusion: Diffusion, split, p2p, path: Path, dev, steps: int, strength: float):
    was_training = net.training
    net.eval()
    cond = torch.cat([split.mr, p2p], 1).to(dev)
    fake = diffusion.sample(net, cond, sampler="ddim", steps=steps, init=p2p.to(dev), strength=strength, seed=0).cpu()
    rows = [[m.numpy(), r.numpy(), p.numpy(), f.numpy()] for m, r, p, f in zip(split.mr, split.fusion, p2p, fake)]
    plots.save_grid(rows, path, ["MR", "real", "pix2pix", "cDDPM"])
    net.train(was_training)


def main(argv=None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m training cddpm", description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="paired data set directory")
    ap.add_argument("--pix2pix", required=True, help="Pix2Pix checkpoint.pt (its generator is frozen)")
    ap.add_argument("--out", required=True, help="run directory; the model directory goes to OUT/model")
    ap.add_argument("--preset", default="small", help="denoiser preset: base, small (shipped), tiny")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--crop", type=int, default=128, help="random crop size (the net is fully convolutional)")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--decay-start", type=float, default=1.0,
                    help="fraction of steps after which the LR decays linearly to 0 (1.0 = constant)")
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--schedule", default="cosine", choices=["cosine", "linear"])
    ap.add_argument("--prediction", default="v", choices=["v", "eps"])
    ap.add_argument("--timesteps", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-amp", action="store_true", help="fp32 only (default: fp16 on CUDA, bf16 on a CPU with native bf16)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--stop-after", type=int)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--sample-every", type=int, default=500)
    ap.add_argument("--sample-steps", type=int, default=8, help="fast-sampler steps written to the card")
    ap.add_argument("--sample-strength", type=float, default=0.5, help="warm-start strength written to the card")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--lesion-weight", type=float, default=1.0,
                    help="draw pairs of studies with a lesion this many times as often (pairs.csv lesion=1)")
    ap.add_argument("--uptake-weight", type=float, default=1.0,
                    help="weight the loss on hot pixels of the real fusion 1 + (W-1) u^2 (u: its PET share)")
    ap.add_argument("--lesion-mask-weight", type=float, default=1.0,
                    help="weight the loss inside the phantom's lesion masks this many times (needs --phantom)")
    ap.add_argument("--lesion-uptake-weight", type=float, default=1.0,
                    help="inside the phantom's lesion masks only, weight hot pixels 1 + (W-1) u^2 (needs --phantom)")
    ap.add_argument("--phantom", help="the `dicomnode phantom` export the data set was built from (lesion masks)")
    ap.add_argument("--version", help="model version string for the card")
    ap.add_argument("--init", metavar="MODEL", help="start the denoiser from this model folder's (fine-tuning)")
    ap.add_argument("--pix2pix-folds", nargs="+", metavar="CKPT",
                    help="fold generators (pix2pix --holdout-fold 0..N-1): train on their out-of-fold outputs")
    a = ap.parse_args(argv)
    res = train(a.data, a.pix2pix, a.out, preset=a.preset, steps=a.steps, batch_size=a.batch_size, crop=a.crop,
                lr=a.lr, decay_start=a.decay_start, ema_decay=a.ema_decay, schedule=a.schedule, prediction=a.prediction,
                timesteps=a.timesteps, seed=a.seed, device=a.device, amp=not a.no_amp, resume=a.resume,
                stop_after=a.stop_after, threads=a.threads, sample_every=a.sample_every,
                sample_steps=a.sample_steps, sample_strength=a.sample_strength, limit=a.limit, version=a.version,
                lesion_weight=a.lesion_weight, pix2pix_folds=a.pix2pix_folds,
                uptake_weight=a.uptake_weight, lesion_mask_weight=a.lesion_mask_weight,
                lesion_uptake_weight=a.lesion_uptake_weight, phantom=a.phantom, init=a.init)
    print(json.dumps(res))
    return 0
