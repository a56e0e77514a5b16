"""Choose a Pix2Pix checkpoint on the validation split, by image quality and by the hot-spot uptake it shows.

    python -m training select --data DATA_DIR RUN/snapshots/step*.pt [--out select.json]

With the adversarial term, the uptake a generator paints at an infected disc swings from one
checkpoint to the next by more than the last step's loss tells (docs/experiments/model-0.4.md), so a run keeps
snapshots (`pix2pix --snapshot-every`) and this command scores each on pairs it was not trained on:

- PSNR and SSIM over every validation pair (fusion images in [0, 1]);
- **uptake shown**: the PET colour (`trainutil.uptake_map`) the generator paints inside a mask
  over the real fusion's there, pooled over the pairs of studies with a lesion (pairs.csv
  `lesion` = 1; every pair when the export has no lesion labels); 1.0 shows all the uptake, 0 is
  an image without PET. The mask is the lesion itself when the data set comes from
  `dicomnode phantom` and `--phantom EXPORT` names it (the masks are re-simulated from its seed);
  otherwise the hot pixels of the real fusion (u >= 0.5: infected discs, but also myocardium and
  bladder, whose uptake the MR hides too, so it is a weaker guide: docs/experiments/model-0.4.md).

The pick is the checkpoint showing the most uptake among those whose SSIM is within
`--ssim-margin` of the best, so that a checkpoint that smears colour everywhere does not win.
Checkpoints saved mid-run (no BatchNorm recalibration) are recalibrated on the train split first,
as the end of training does; `--save-pick PATH` writes the pick with those statistics, ready for
`python -m training cddpm --pix2pix PATH`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from dicomnode.tools import imagemetrics
from training.pix2pix import load_generator, recalibrate_bn
from training.trainutil import Split, autocast, load_split, resolve_device, uptake_map

HOT = 0.5  # PET colour above which a real fusion pixel counts as a hot spot


@dataclass(frozen=True)
class Score:
    checkpoint: str
    step: int | None
    psnr: float
    ssim: float
    uptake_shown: float | None
    mask_pixels: int
    recalibrated: bool


def uptake_sums(mr: torch.Tensor, real: torch.Tensor, pred: torch.Tensor,
                mask: torch.Tensor | None = None, hot: float = HOT) -> tuple[float, float]:
    """(PET colour predicted, PET colour real) summed inside `mask` (N,1,H,W), by default the real
    fusion's hot pixels; images in [-1, 1]. Their ratio is the share of the uptake shown."""
    u_real = uptake_map(mr, real)
    mask = u_real >= hot if mask is None else mask.bool()
    return float(uptake_map(mr, pred)[mask].sum()), float(u_real[mask].sum())


def phantom_lesion_masks(export: str | Path, split: Split) -> torch.Tensor:
    """Lesion masks (N,1,H,W) on the model grid for the pairs of `split`, re-simulated from the
    `dicomnode phantom` export the data set was built from (its cases.json gives seed and cases)."""
    from dicomnode.infer.grid import GridPlacement
    from dicomnode.tools.phantom.generate import plan_cases, simulate

    info_path = Path(export) / "cases.json"
    if not info_path.is_file():
        raise ValueError(f"{export}: no cases.json, not a dicomnode phantom export")
    info = json.loads(info_path.read_text())
    cases = {c["case_id"]: c for c in info["cases"]}
    specs = {s.case_id: s for s in plan_cases(len(info["cases"]), info["seed"], info.get("lesion_fraction", 0.5),
                                              **info.get("plan", {}))}  # "plan": the generator's size options
    size = split.mr.shape[-1]
    masks = torch.zeros(len(split), 1, size, size, dtype=torch.bool)
    rows_of: dict[str, list[int]] = {}
    for i, r in enumerate(split.rows):  # the data set names its phantom case (its UIDs are pseudonyms)
        rows_of.setdefault(r.get("phantom_case", ""), []).append(i)
    for case_id, idx in rows_of.items():
        case = cases.get(case_id)
        if case is None:
            raise ValueError(f"{export}: case {case_id or '(none)'} of the data set is not in cases.json")
        spec = specs[case["case_id"]]
        if (spec.rows, spec.cols, spec.slices) != (case["rows"], case["cols"], case["slices"]):
            raise ValueError(f"{export}: {case['case_id']} does not re-plan as written (other phantom options?)")
        if not spec.lesion:
            continue
        spec.pet_grid = "mr"  # the lesion mask is on the MR grid: no need to simulate the scanner's PET
        sim = simulate(spec)
        place = GridPlacement.for_image(spec.rows, spec.cols, (sim.grid.row_spacing, sim.grid.col_spacing), size=size)
        for i in idx:
            k = int(split.rows[i]["slice_index"])
            masks[i, 0] = torch.from_numpy(place.to_grid(sim.lesion_mask[k].astype(np.float32), fill=0.0) > 0.5)
    return masks


def lesion_study_rows(split: Split) -> torch.Tensor:
    """Boolean (N,): pairs of studies labelled with a lesion; all pairs when none is labelled."""
    flags = torch.tensor([str(r.get("lesion", "")) == "1" for r in split.rows])
    return flags if bool(flags.any()) else torch.ones(len(split), dtype=torch.bool)


@torch.inference_mode()
def predict(G, mr: torch.Tensor, dev, batch_size: int = 8, amp: bool = True) -> torch.Tensor:
    outs = []
    for i in range(0, len(mr), batch_size):
        with autocast(dev, amp):
            outs.append(G(mr[i:i + batch_size].to(dev).contiguous(memory_format=torch.channels_last)).float().cpu())
    return torch.cat(outs).clamp(-1, 1)


def ready_generator(path: str | Path, train_mr: Callable[[], torch.Tensor] | None, dev):
    """(generator, checkpoint dict, recalibrated now): BatchNorm statistics recomputed on the
    train slices `train_mr()` (loaded only when needed) for a checkpoint saved mid-run, as the end
    of training does."""
    G, _, state = load_generator(path, dev)
    recal = not state.get("bn_recalibrated", False) and train_mr is not None
    if recal and train_mr is not None:
        recalibrate_bn(G, train_mr(), int(state.get("batch_size", 4)), dev)
    return G, state, recal


def save_pick(path: str | Path, G_state: dict, recalibrated: bool, dest: str | Path) -> Path:
    """Write the chosen checkpoint with the generator weights it was scored with (`G_state`,
    BatchNorm recalibrated if `recalibrated`), without the optimiser state."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    keep = {k: v for k, v in state.items() if k not in ("D", "opt_g", "opt_d", "sched", "scaler", "rng")}
    keep.update(G=G_state, bn_recalibrated=bool(recalibrated or state.get("bn_recalibrated")), selected_from=str(path))
    torch.save(keep, dest)
    return Path(dest)


def psnr_ssim(real: torch.Tensor, pred: torch.Tensor, chunk: int = 32) -> dict[str, np.ndarray]:
    """Per-pair PSNR and SSIM of fusions in [-1, 1] (scored in [0, 1]), in chunks to bound memory."""
    real01, pred01 = imagemetrics.unit_to_01(real), imagemetrics.unit_to_01(pred)
    chunks = [imagemetrics.all_metrics(real01[i:i + chunk], pred01[i:i + chunk]) for i in range(0, len(pred), chunk)]
    return {k: np.concatenate([np.atleast_1d(c[k]) for c in chunks]) for k in ("psnr", "ssim")}


def score_checkpoint(path: str | Path, val: Split, train_mr: Callable[[], torch.Tensor] | None, dev,
                     amp: bool = True, masks: torch.Tensor | None = None) -> tuple[Score, dict]:
    """Score one checkpoint on `val` (uptake inside `masks`, default the hot pixels), after
    recalibrating its BatchNorm if it was saved mid-run; also the generator weights scored."""
    G, state, recal = ready_generator(path, train_mr, dev)
    pred = predict(G, val.mr, dev, amp=amp)
    m = psnr_ssim(val.fusion, pred)
    keep = lesion_study_rows(val)
    mask = (uptake_map(val.mr[keep], val.fusion[keep]) >= HOT) if masks is None else masks[keep]
    shown, real = uptake_sums(val.mr[keep], val.fusion[keep], pred[keep], mask)
    score = Score(str(path), state.get("step"), round(float(m["psnr"].mean()), 3), round(float(m["ssim"].mean()), 4),
                  round(shown / real, 4) if real > 0 else None, int(mask.sum()), recal)
    return score, {k: v.detach().cpu().clone() for k, v in G.state_dict().items()}


def pick(scores: list[Score], ssim_margin: float = 0.01) -> Score:
    """The most uptake shown among the checkpoints within `ssim_margin` of the best SSIM
    (the best SSIM alone when no pair has hot pixels)."""
    if not scores:
        raise ValueError("no checkpoints to choose from")
    best_ssim = max(s.ssim for s in scores)
    near = [s for s in scores if s.ssim >= best_ssim - ssim_margin]
    if all(s.uptake_shown is None for s in near):
        return max(near, key=lambda s: s.ssim)
    return max((s for s in near if s.uptake_shown is not None), key=lambda s: s.uptake_shown or 0.0)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m training select", description=__doc__.split("\n")[0])
    ap.add_argument("checkpoints", nargs="+", help="Pix2Pix checkpoints (pix2pix --snapshot-every writes them)")
    ap.add_argument("--data", required=True, help="the paired data set the checkpoints were trained on")
    ap.add_argument("--split", default="val", help="split to score on (default val)")
    ap.add_argument("--limit", type=int, default=None, help="score at most this many pairs, evenly spread")
    ap.add_argument("--phantom", help="the dicomnode phantom export the data set was built from: "
                    "score the uptake inside the re-simulated lesion masks instead of the hot pixels")
    ap.add_argument("--ssim-margin", type=float, default=0.01, help="SSIM below the best that is still eligible")
    ap.add_argument("--no-recalibrate", action="store_true",
                    help="score mid-run checkpoints with their running BatchNorm statistics as saved")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-amp", action="store_true", help="float32 instead of bf16/fp16 autocast")
    ap.add_argument("--out", help="write the scores and the pick as JSON here")
    ap.add_argument("--save-pick", help="write the pick (BatchNorm recalibrated) here, for cddpm --pix2pix")
    ap.add_argument("--recalibrate-limit", type=int, default=None,
                    help="recalibrate BatchNorm on at most this many train pairs, evenly spread (default all)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    val = load_split(args.data, args.split, args.limit)
    train_mr = None if args.no_recalibrate else functools.cache(
        lambda: load_split(args.data, "train", args.recalibrate_limit).mr)
    masks = phantom_lesion_masks(args.phantom, val) if args.phantom else None
    mask_kind = "lesion" if masks is not None else f"hot (u >= {HOT})"
    scores, weights = [], {}
    print(f"{'checkpoint':<48} {'PSNR':>7} {'SSIM':>6}  uptake shown, {mask_kind}")
    for path in args.checkpoints:
        s, G_state = score_checkpoint(path, val, train_mr, dev, amp=not args.no_amp, masks=masks)
        scores.append(s)
        if args.save_pick:
            weights[s.checkpoint] = G_state
        shown = "—" if s.uptake_shown is None else f"{s.uptake_shown:.1%}"
        print(f"{str(path):<48} {s.psnr:7.2f} {s.ssim:6.3f}  {shown:>8}", flush=True)
    best = pick(scores, args.ssim_margin)
    print(f"pick: {best.checkpoint}")
    if args.save_pick:
        print(f"saved: {save_pick(best.checkpoint, weights[best.checkpoint], best.recalibrated, args.save_pick)}")
    if args.out:
        Path(args.out).write_text(json.dumps({"data": str(args.data), "split": args.split, "mask": mask_kind,
                                              "ssim_margin": args.ssim_margin, "pick": best.checkpoint,
                                              "scores": [asdict(s) for s in scores]}, indent=1))
    return 0
