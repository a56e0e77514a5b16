"""Choose how the PET part of the model's output is finished, on the validation split, and write the card's `output` block.

    python -m training finish --model DIR --data DATA [--phantom EXPORT] [--limit N] [--write]

The finish (dicomnode/infer/presentation.py) keeps the grey of the output exactly the input MR's,
smooths the PET colour part by a Gaussian of sigma grid pixels, keeps it a colour the map can
make and sets its black level (floor). This runs the model once over the validation pairs (the
card's sampler, unfinished), then scores every pair of `--sigmas` and `--floors` on the same
outputs: PSNR and SSIM, and the uptake shown as `training select` measures it (inside the lesion
masks with `--phantom`, else in the real fusion's hot pixels). The pick is the best SSIM among the
settings whose uptake shown is at least the unfinished output's, or all of the real uptake if the
unfinished output shows more, less `--uptake-margin`: the finish cannot buy image quality with the
infected disc's colour. Declare the block only for fusions rendered as the phantom renders them
(docs/reference/model-format.md).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dicomnode.infer.model import load_model, read_card, write_card
from dicomnode.infer.presentation import OutputSpec, finish_fusion
from training.select import HOT, lesion_study_rows, phantom_lesion_masks, psnr_ssim, uptake_sums
from training.trainutil import load_split, resolve_device, uptake_map

SIGMAS = (0.0, 0.5, 0.75, 1.0, 1.5, 2.0)
FLOORS = (0.0, 0.01, 0.02, 0.03)


@dataclass(frozen=True)
class FinishScore:
    sigma: float | None     # None: the unfinished output
    floor: float | None
    psnr: float
    ssim: float
    uptake_shown: float | None


def score(real: torch.Tensor, pred: torch.Tensor, mr: torch.Tensor, keep: torch.Tensor, mask: torch.Tensor,
          spec: OutputSpec | None) -> FinishScore:
    m = psnr_ssim(real, pred)
    shown, total = uptake_sums(mr[keep], real[keep], pred[keep], mask)
    sigma, floor = (None, None) if spec is None else (spec.pet_sigma_px, spec.pet_floor)
    return FinishScore(sigma, floor, round(float(m["psnr"].mean()), 3), round(float(m["ssim"].mean()), 4),
                       round(shown / total, 4) if total > 0 else None)


def pick(raw: FinishScore, scores: list[FinishScore], uptake_margin: float = 0.01) -> FinishScore:
    """The best SSIM among `scores` whose uptake shown is at least min(`raw`'s, 1) - `uptake_margin`
    (taking back uptake the unfinished output paints beyond the real one is no loss)."""
    need = None if raw.uptake_shown is None else min(raw.uptake_shown, 1.0) - uptake_margin
    ok = [s for s in scores if need is None or s.uptake_shown is None or s.uptake_shown >= need]
    if not ok:
        raise ValueError("every setting loses more uptake than the margin allows")
    return max(ok, key=lambda s: (s.ssim, -(s.sigma or 0.0), -(s.floor or 0.0)))


def _label(s: FinishScore) -> str:
    return "raw" if s.sigma is None else f"{s.sigma:g} / {s.floor:g}"


def _shown(s: FinishScore) -> str:
    return "n/a" if s.uptake_shown is None else f"{s.uptake_shown:.1%}"


def main(argv=None) -> int:
    import argparse
    import shlex
    import sys

    ap = argparse.ArgumentParser(prog="python -m training finish", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="model directory (its card's `output` block is ignored here)")
    ap.add_argument("--data", required=True, help="the paired data set the model was trained on")
    ap.add_argument("--split", default="val")
    ap.add_argument("--limit", type=int, default=None, help="at most this many pairs, evenly spread")
    ap.add_argument("--phantom", help="the dicomnode phantom export the data set was built from: uptake inside "
                    "the re-simulated lesion masks instead of the hot pixels")
    ap.add_argument("--sigmas", default=",".join(str(s) for s in SIGMAS), help="comma-separated, grid pixels")
    ap.add_argument("--floors", default=",".join(str(s) for s in FLOORS),
                    help="comma-separated PET black levels, shares of the colour map")
    ap.add_argument("--opacity", type=float, default=0.5, help="PET opacity of the training fusions")
    ap.add_argument("--colormap", default="hot", help="PET colour map of the training fusions")
    ap.add_argument("--uptake-margin", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", help="write the scores and the pick as JSON here")
    ap.add_argument("--write", action="store_true", help="write the pick into the card's `output` block")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    sigmas = [float(s) for s in a.sigmas.split(",") if s.strip()]
    floors = [float(f) for f in a.floors.split(",") if f.strip()]
    specs = [OutputSpec(a.colormap, a.opacity, s, f) for s in sigmas for f in floors]  # validates before the long part
    model = load_model(a.model, resolve_device(a.device))
    val = load_split(a.data, a.split, a.limit)
    keep = lesion_study_rows(val)
    masks = phantom_lesion_masks(a.phantom, val) if a.phantom else None
    mask = (uptake_map(val.mr[keep], val.fusion[keep]) >= HOT) if masks is None else masks[keep]
    raw = torch.cat([model.translate(val.mr[i:i + a.batch_size].to(model.device), seed=a.seed + i, finish=False)
                     .rgb.float().cpu() for i in range(0, len(val), a.batch_size)])
    base = score(val.fusion, raw, val.mr, keep, mask, None)
    scores = [score(val.fusion, finish_fusion(raw, val.mr, spec), val.mr, keep, mask, spec) for spec in specs]
    best = pick(base, scores, a.uptake_margin)
    mask_kind = "lesion masks" if masks is not None else f"hot pixels (u >= {HOT})"
    print(f"{'sigma / floor':>14} {'PSNR':>7} {'SSIM':>7}  uptake shown, {mask_kind}")
    for s in [base, *scores]:
        print(f"{_label(s):>14} {s.psnr:7.3f} {s.ssim:7.4f}  {_shown(s):>8}{'  <- pick' if s is best else ''}")
    args = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python -m training finish", *(shlex.quote(x) for x in args if x != "--write")])
    result = {"pairs": len(val), "split": a.split, "uptake_mask": mask_kind, "raw": asdict(base),
              "scores": [asdict(s) for s in scores], "pick": {"pet_sigma_px": best.sigma, "pet_floor": best.floor},
              "command": command}
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    if a.write:
        card = read_card(a.model)
        table = "; ".join(f"{_label(s)} {s.psnr:.2f} dB / {s.ssim:.4f} / {_shown(s)}" for s in [base, *scores])
        card["output"] = {"colormap": a.colormap, "opacity": a.opacity, "pet_sigma_px": best.sigma,
                          "pet_floor": best.floor,
                          "selected_on": f"{a.split} split, {len(val)} pairs, uptake in the {mask_kind} "
                                         f"(sigma / floor: PSNR / SSIM / uptake shown): {table}; command: {command}"}
        write_card(a.model, card)
        print(f"wrote output block (pet_sigma_px {best.sigma:g}, pet_floor {best.floor:g}) into "
              f"{Path(a.model) / 'model.json'}")
    return 0
