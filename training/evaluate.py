"""Evaluation as in the paper: PSNR, SSIM, MAE, MSE (mean ± SD) of the synthetic fusion against
the real one on a split, stratified by FDG uptake tertile, plus the ablation Pix2Pix alone vs
Pix2Pix + cDDPM (fast sampler) vs Pix2Pix + cDDPM (full ancestral DDPM, on a subset).

    python -m training evaluate --model models/t2fs2petfusion --data DATA_DIR --out runs/eval [--json]

Synthetic images are quantised to uint8 exactly as the node stores them before scoring.
Writes OUT/per_case.csv, OUT/summary.json and OUT/comparison.png
(MR | real | synthetic | |difference| | uncertainty).
"""

from __future__ import annotations

import csv
import json
import math
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from dicomnode.infer.grid import unit_to_rgb
from dicomnode.infer.model import load_model, read_card, write_card
from dicomnode.tools.imagemetrics import METRIC_NOTE, all_metrics
from training import plots
from training.trainutil import load_split, progress, resolve_device

METRICS = ("psnr", "ssim", "mae", "mse")


def to_uint8(batch: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> uint8 (B, 3, H, W), the same rounding as the stored series."""
    return np.stack([np.moveaxis(unit_to_rgb(x.cpu().numpy()), -1, 0) for x in batch])


def score(real: torch.Tensor, fake: torch.Tensor) -> dict[str, np.ndarray]:
    return {k: np.atleast_1d(v) for k, v in all_metrics(to_uint8(real), to_uint8(fake)).items()}


def summarise(values: dict[str, np.ndarray]) -> dict:
    """mean and SD (population, ddof 0) per metric; infinite PSNR (identical images) is capped at 100 dB."""
    out = {}
    for k in METRICS:
        v = np.asarray(values[k], dtype=np.float64)
        if k == "psnr":
            v = np.minimum(v, 100.0)
        out[k] = {"mean": float(v.mean()) if v.size else math.nan, "sd": float(v.std()) if v.size else math.nan}
    return out


def _fmt(s: dict) -> str:
    return ", ".join(f"{k.upper()} {s[k]['mean']:.4g} ± {s[k]['sd']:.3g}" for k in METRICS)


def _run(model, mr, batch_size, dev, quiet, label, seed: int = 0, **kw):
    """Run the model over all slices in batches (seed + first index per batch); returns
    (rgb, sd or None, seconds per slice)."""
    rgbs, sds, t0 = [], [], time.perf_counter()
    with progress(disable=quiet) as bar:
        task = bar.add_task(label, total=len(mr), info="")
        for i in range(0, len(mr), batch_size):
            res = model.translate(mr[i:i + batch_size].to(dev), seed=seed + i, **kw)
            rgbs.append(res.rgb.float().cpu())
            sds.append(None if res.sd is None else res.sd.float().cpu())
            bar.update(task, advance=len(res.rgb))
    secs = (time.perf_counter() - t0) / max(1, len(mr))
    sd = None if sds[0] is None else torch.cat([s for s in sds if s is not None])
    return torch.cat(rgbs), sd, secs


def tertiles(rows: list[dict]) -> tuple[np.ndarray, list[float]]:
    """Label each case 0/1/2 by uptake tertile (-1 where uptake is unknown) and return the cut points."""
    up = np.array([float(r["uptake"]) if r.get("uptake") not in (None, "") else np.nan for r in rows])
    known = up[~np.isnan(up)]
    if known.size < 3:
        return np.full(len(rows), -1), []
    cuts = [float(c) for c in np.quantile(known, [1 / 3, 2 / 3])]
    lab = np.where(np.isnan(up), -1, np.digitize(up, cuts, right=True))
    return lab, cuts


def evaluate(model_dir: str | Path, data: str | Path, out: str | Path, *, split: str = "test",
             sampler: str | None = None, steps: int | None = None, strength: float | None = None,
             samples: int | None = None, seed: int = 0, device: str = "auto", batch_size: int = 4,
             limit: int | None = None, full_subset: int = 2, figure_cases: int = 4, figure_samples: int = 4,
             threads: int | None = None, update_card: bool = False, command: str | None = None,
             quiet: bool = False) -> dict:
    """Score a model directory on a split; returns the summary (also written to OUT/summary.json)."""
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    model = load_model(model_dir, dev)
    data_split = load_split(data, split, limit)
    opts = {k: v for k, v in dict(sampler=sampler, steps=steps, strength=strength, samples=samples).items() if v is not None}
    fast = dict(model.defaults, **opts)
    mr, real = data_split.mr, data_split.fusion

    p2p, _, t_p2p = _run(model, mr, batch_size, dev, quiet, "pix2pix", refine=False, finish=False)  # the raw generator
    syn, _, t_fast = _run(model, mr, batch_size, dev, quiet, "cddpm fast", seed=seed, **opts)
    m_p2p, m_fast = score(real, p2p), score(real, syn)

    # ablation on an evenly spread subset: full ancestral DDPM from pure noise (paper-faithful)
    sub: np.ndarray = (np.unique(np.linspace(0, len(mr) - 1, min(full_subset, len(mr))).round().astype(int))
                       if full_subset else np.zeros(0, dtype=int))
    ablation = {"n": len(sub), "cases": [int(data_split.rows[i]["index"]) for i in sub]}
    if len(sub):
        full, _, t_full = _run(model, mr[sub], batch_size, dev, quiet, "cddpm full DDPM", seed=seed,
                               sampler="ddpm", strength=1.0, samples=1)
        ablation.update({
            "pix2pix": summarise({k: v[sub] for k, v in m_p2p.items()}),
            "cddpm_fast": summarise({k: v[sub] for k, v in m_fast.items()}),
            "cddpm_ddpm": summarise(score(real[sub], full)),
            "network_evaluations": {"pix2pix": 0, "cddpm_fast": int(fast["steps"]) * int(fast["samples"]),
                                    "cddpm_ddpm": model.diffusion.timesteps},
            "seconds_per_slice": {"pix2pix": t_p2p, "cddpm_fast": t_fast, "cddpm_ddpm": t_full}})

    labels, cuts = tertiles(data_split.rows)
    strata = []
    for lab, name in ((0, "low"), (1, "middle"), (2, "high"), (-1, "no uptake recorded")):
        sel = labels == lab
        if sel.any():
            strata.append({"tertile": name, "n": int(sel.sum()),
                           "cddpm": summarise({k: v[sel] for k, v in m_fast.items()}),
                           "pix2pix": summarise({k: v[sel] for k, v in m_p2p.items()})})

    with open(out / "per_case.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "patient_id", "slice_index", "uptake", "lesion", "uptake_tertile"]
                   + [f"{m}_{k}" for m in ("pix2pix", "cddpm") for k in METRICS])
        for i, r in enumerate(data_split.rows):
            w.writerow([r["index"], r["patient_id"], r["slice_index"], r["uptake"], r["lesion"], int(labels[i])]
                       + [f"{m[k][i]:.6g}" for m in (m_p2p, m_fast) for k in METRICS])

    fig = _figure(model, data_split, syn, out / "comparison.png", figure_cases, figure_samples, seed, fast, dev)

    summary = {
        "model": model.version, "model_dir": str(model_dir), "split": split, "n": len(mr),
        "metric_definitions": METRIC_NOTE + "; synthetic quantised to uint8 like the stored series",
        "pipeline": {"sampler": fast["sampler"], "steps": int(fast["steps"]), "strength": float(fast["strength"]),
                     "samples": int(fast["samples"]), "seed": seed, "device": str(dev)},
        **summarise(m_fast),
        "pix2pix": summarise(m_p2p),
        "seconds_per_slice": {"pix2pix": t_p2p, "pipeline": t_fast},
        "uptake_tertiles": {"cuts": cuts, "strata": strata},
        "ablation": ablation,
        "figure": str(fig),
        "data": {"dir": str(data), "counts": data_split.manifest.get("counts"), "seed": data_split.manifest.get("seed")},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if update_card:
        card = read_card(model_dir)
        card["metrics"] = {k: summary[k] for k in ("split", "n", "metric_definitions", "pipeline", *METRICS,
                                                    "pix2pix", "uptake_tertiles", "ablation", "seconds_per_slice")}
        card["metrics"].update({"command": command, "data": summary["data"], "evaluated": summary["created"]})
        write_card(model_dir, card)
    return summary


def report(summary: dict) -> str:
    """Human-readable text of a summary (what the command prints without --json)."""
    lines = [f"model {summary['model']} on split '{summary['split']}' (n={summary['n']})",
             f"metric choices: {summary['metric_definitions']}",
             f"pipeline ({summary['pipeline']['sampler']}, {summary['pipeline']['steps']} steps, "
             f"strength {summary['pipeline']['strength']}): {_fmt(summary)}",
             f"pix2pix alone: {_fmt(summary['pix2pix'])}"]
    for s in summary["uptake_tertiles"]["strata"]:
        lines.append(f"  uptake {s['tertile']} (n={s['n']}): {_fmt(s['cddpm'])}")
    ab = summary["ablation"]
    if ab.get("n"):
        lines.append(f"ablation on {ab['n']} slices (network evaluations {ab['network_evaluations']}):")
        for k in ("pix2pix", "cddpm_fast", "cddpm_ddpm"):
            lines.append(f"  {k}: {_fmt(ab[k])}  ({ab['seconds_per_slice'][k]:.3f} s/slice)")
    lines.append(f"figure: {summary['figure']}")
    return "\n".join(lines)


@torch.no_grad()
def _figure(model, split, syn, path: Path, n: int, k: int, seed: int, fast: dict, dev) -> Path:
    """MR | real | synthetic | |difference| | uncertainty (SD over k samples) for n spread cases."""
    idx = np.unique(np.linspace(0, len(split) - 1, min(n, len(split))).round().astype(int))
    res = model.translate(split.mr[idx].to(dev), seed=seed, sampler=fast["sampler"], steps=int(fast["steps"]),
                          strength=float(fast["strength"]), samples=max(2, k))
    rows = []
    for j, i in enumerate(idx):
        real_u8 = unit_to_rgb(split.fusion[i].numpy())
        syn_u8 = unit_to_rgb(syn[i].numpy())
        diff = np.abs(real_u8.astype(np.float32) - syn_u8.astype(np.float32)).mean(-1) / 255.0
        sd = res.sd[j].float().cpu().mean(0).numpy() / 2.0  # SD in the [0, 1] intensity scale
        rows.append([split.mr[i].numpy(), real_u8, syn_u8, plots.heat(diff, 0.25), plots.heat(sd, 0.1)])
    return plots.save_grid(rows, path, ["MR", "real fusion", "synthetic", "|diff| (0-.25)", "SD (0-.1)"])


def main(argv=None) -> int:
    import argparse
    import shlex
    import sys

    ap = argparse.ArgumentParser(prog="python -m training evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="model directory (model.json + safetensors)")
    ap.add_argument("--data", required=True, help="paired data set directory")
    ap.add_argument("--out", required=True, help="writes per_case.csv, summary.json, comparison.png")
    ap.add_argument("--split", default="test", choices=["train", "val", "test"])
    ap.add_argument("--sampler", choices=["ddim", "dpmpp2m", "ddpm"], help="default: the card's")
    ap.add_argument("--steps", type=int, help="fast-sampler network evaluations (default: the card's)")
    ap.add_argument("--strength", type=float, help="warm-start noise level in (0, 1]; 1 = from pure noise")
    ap.add_argument("--samples", type=int, help="K samples averaged per slice")
    ap.add_argument("--full-subset", type=int, default=2, help="slices for the full DDPM ablation (0 = skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--limit", type=int, help="at most this many (evenly spread) pairs")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--update-card", action="store_true", help="write metrics and this command into model.json")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    a = ap.parse_args(argv)
    command = "python -m training evaluate " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[2:]))
    summary = evaluate(a.model, a.data, a.out, split=a.split, sampler=a.sampler, steps=a.steps, strength=a.strength,
                       samples=a.samples, seed=a.seed, device=a.device, batch_size=a.batch_size, limit=a.limit,
                       full_subset=a.full_subset, threads=a.threads, update_card=a.update_card, command=command,
                       quiet=a.json)
    print(json.dumps(summary, indent=2) if a.json else report(summary))
    return 0
