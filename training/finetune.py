"""Fine-tune a model folder on a site's paired data set: the generator, then the cDDPM on the
fine-tuned generator's outputs, both starting from the model's own weights.

    python -m training finetune --init models/t2fs2petfusion --data DATA --out runs/site

Writes OUT/p2p (the generator run), OUT/ddpm (the cDDPM run) and OUT/model, a model folder
`dicomnode serve` accepts. Its card records where it came from: the starting model, the data's
provenance (patients, studies and slices per split, de-identified, study years only), the recipe
and these commands. Compare it with the starting model before use (`python -m training compare`).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from dicomnode.infer.model import read_card, write_card

log = logging.getLogger(__name__)


# The small-data recipe: a tenth of the from-scratch learning rates, decayed linearly to zero from
# the start, the starting model's sampler and output finish. Step counts (each network) by the
# size of the train split, chosen on a 24-patient validation split of phantom raw-PET pairs at 20,
# 50 and 198 training studies (docs/experiments/site-data.md): 300 below SMALL_SLICES training
# slices (about 35 studies), else 1,000. More steps gained no PSNR at 198 studies and showed less
# of the lesion uptake.
@dataclass(frozen=True)
class Recipe:
    pix2pix_lr: float = 2e-5
    cddpm_lr: float = 2e-5
    batch_size: int = 4
    small_steps: int = 300
    steps: int = 1000


RECIPE = Recipe()
SMALL_SLICES = 600


def recipe_steps(data: str | Path) -> int:
    """The recipe's step count (each network) for a data set: by its train split's slices."""
    with open(Path(data) / "pairs.csv", newline="") as fh:
        train = sum(1 for r in csv.DictReader(fh) if r["split"] == "train")
    return RECIPE.small_steps if train < SMALL_SLICES else RECIPE.steps


def finetune(init: str | Path, data: str | Path, out: str | Path, *, pix2pix_steps: int | None = None,
             pix2pix_lr: float = RECIPE.pix2pix_lr, cddpm_steps: int | None = None,
             cddpm_lr: float = RECIPE.cddpm_lr, batch_size: int = RECIPE.batch_size, seed: int = 0,
             device: str = "auto", threads: int | None = None, version: str | None = None,
             quiet: bool = False, command: str | None = None) -> dict:
    from training import cddpm, pix2pix

    out = Path(out)
    start = read_card(init)
    auto = recipe_steps(data)
    rule = f"{RECIPE.small_steps} below {SMALL_SLICES} training slices, else {RECIPE.steps}"
    pix2pix_steps = auto if pix2pix_steps is None else pix2pix_steps
    cddpm_steps = auto if cddpm_steps is None else cddpm_steps
    p2p = pix2pix.train(data, out / "p2p", steps=pix2pix_steps, lr=pix2pix_lr, batch_size=batch_size,
                        decay_start=0.0, seed=seed, device=device, threads=threads, quiet=quiet, init=init,
                        sample_every=max(pix2pix_steps, 1))
    name = str(start.get("name", "t2fs2petfusion"))
    ddpm = cddpm.train(data, p2p["checkpoint"], out / "ddpm", steps=cddpm_steps, lr=cddpm_lr,
                       batch_size=max(batch_size, 2), decay_start=0.0, seed=seed, device=device, threads=threads,
                       quiet=quiet, init=init, name=name,
                       version=version or f"{start.get('version', name)}+site", sample_every=max(cddpm_steps, 1))
    model = out / "model"
    if model.exists():
        shutil.rmtree(model)
    shutil.copytree(ddpm["model_dir"], model)
    manifest = json.loads((Path(data) / "manifest.json").read_text())
    card = read_card(model)
    card["provenance"] = {
        "starting_model": start.get("version"),
        "data": {"counts": manifest.get("counts"), "source": manifest.get("source"),
                 "study_years": manifest.get("study_years"), "deidentified": "deidentification" in manifest,
                 "split_seed": manifest.get("seed")},
        "recipe": {"pix2pix": {"steps": pix2pix_steps, "lr": pix2pix_lr, "decay": "linear from the start",
                               "discriminator": "new"},
                   "cddpm": {"steps": cddpm_steps, "lr": cddpm_lr, "decay": "linear from the start"},
                   "batch_size": batch_size, "seed": seed, "sampler_and_finish": "the starting model's",
                   "steps_rule": rule},
        **({"command": command} if command else {}),
    }
    card["limitations"] = (str(start.get("limitations", "")) + " Fine-tuned at a site from "
                           f"{start.get('version')}: compare it with the starting model on the site's own "
                           "test patients before use (python -m training compare).").strip()
    card.pop("gate", None)  # the starting model's gate measured the starting generator
    write_card(model, card)
    gate = _calibrate_gate(model, data, threads)
    return {"model_dir": str(model), "version": card["version"], "pix2pix": p2p, "cddpm": ddpm, "gate": gate}


def _calibrate_gate(model: Path, data: str | Path, threads: int | None) -> str:
    """The new generator's input gate and the output check, from the site's own train and val splits."""
    from training.calibrate import calibrate

    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        block = calibrate(model, data, command=f"python -m training calibrate-gate --model {model} --data {data}")
    except ValueError as exc:  # too few series for a calibration: the node then checks nothing
        log.warning("the safety gate is not calibrated: %s", exc)
        return f"not calibrated: {exc}"
    return f"calibrated on {block['data']['train_series']} training series"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training finetune", description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--init", required=True, metavar="MODEL", help="the model folder to start from")
    ap.add_argument("--data", required=True, help="the site's paired data set (build-dataset)")
    ap.add_argument("--out", required=True, help="run folder; the new model goes to OUT/model")
    ap.add_argument("--pix2pix-steps", type=int, help=f"default: {RECIPE.small_steps} below {SMALL_SLICES} training "
                    f"slices, else {RECIPE.steps}")
    ap.add_argument("--pix2pix-lr", type=float, default=RECIPE.pix2pix_lr)
    ap.add_argument("--cddpm-steps", type=int, help="default: as --pix2pix-steps")
    ap.add_argument("--cddpm-lr", type=float, default=RECIPE.cddpm_lr)
    ap.add_argument("--batch-size", type=int, default=RECIPE.batch_size)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--version", help="the new model's version (default: the starting version + '+site')")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int)
    a = ap.parse_args(argv)
    command = "python -m training finetune " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    res = finetune(a.init, a.data, a.out, pix2pix_steps=a.pix2pix_steps, pix2pix_lr=a.pix2pix_lr,
                   cddpm_steps=a.cddpm_steps, cddpm_lr=a.cddpm_lr, batch_size=a.batch_size, seed=a.seed,
                   device=a.device, threads=a.threads, version=a.version, command=command)
    print(f"{res['version']} -> {res['model_dir']}")
    return 0
