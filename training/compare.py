"""Score two or more models on one split side by side, with paired bootstrap confidence intervals.

    python -m training compare --data DATA --split test --model models/t2fs2petfusion --model runs/site/model \\
        --out runs/compare [--phantom EXPORT] [--write-card]

The first model is the reference A; every other model B is compared with it. Per slice: the
paper's PSNR, SSIM, MAE and MSE (uint8-quantised as the node stores the series). For each
difference B - A, the point estimate is the mean over slices and the 95 % interval comes from a
paired bootstrap that resamples **patients** (slices of one patient are not independent): each
draw takes as many patients as the split has, with replacement, and averages the differences of
all their slices. An interval that excludes 0 gives "better" or "worse" (higher PSNR and SSIM,
lower MAE and MSE are better), otherwise "indistinguishable". Also: each model by uptake tertile
and the Spearman correlation of each metric with the uptake; with `--phantom`, the uptake each
model shows inside the re-simulated lesion masks. Writes OUT/compare.json, OUT/compare.md and
OUT/compare.png; `--write-card` puts the summary into the last model's card.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dicomnode.infer.model import load_model, read_card, write_card
from training.evaluate import METRICS, _run, score, tertiles
from training.trainutil import load_split, resolve_device

HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "mae": False, "mse": False}
UNITS = {"psnr": "dB", "ssim": "", "mae": "", "mse": ""}


def bootstrap_ci(diff: np.ndarray, groups: Sequence[str], draws: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """(mean difference, low, high): percentile interval of the mean over slices, resampling groups
    (patients) with replacement."""
    diff = np.asarray(diff, dtype=np.float64)
    names = sorted(set(groups))
    index = {g: i for i, g in enumerate(names)}
    gid = np.array([index[g] for g in groups])
    sums = np.bincount(gid, weights=diff, minlength=len(names))
    counts = np.bincount(gid, minlength=len(names)).astype(np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(names), size=(draws, len(names)))
    means = sums[picks].sum(1) / counts[picks].sum(1)
    alpha = (1 - level) / 2
    return float(diff.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def verdict(metric: str, low: float, high: float) -> str:
    if low > 0 or high < 0:
        up = low > 0
        return "better" if up == HIGHER_IS_BETTER[metric] else "worse"
    return "indistinguishable"


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    ok = ~(np.isnan(x) | np.isnan(y))
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return None
    from scipy.stats import spearmanr

    return float(spearmanr(x[ok], y[ok]).statistic)


def compare(models: Sequence[str | Path], data: str | Path, out: str | Path, *, split: str = "test",
            seed: int = 0, draws: int = 2000, device: str = "auto", batch_size: int = 4, limit: int | None = None,
            phantom: str | Path | None = None, threads: int | None = None, quiet: bool = False) -> dict:
    if len(models) < 2:
        raise ValueError("compare needs at least two models (the first is the reference)")
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    sp = load_split(data, split, limit)
    if len(sp) == 0:
        raise ValueError(f"split {split!r} of {data} is empty")
    patients = [r["patient_id"] for r in sp.rows]
    uptake = np.array([float(r["uptake"]) if r.get("uptake") not in (None, "") else np.nan for r in sp.rows])
    labels, cuts = tertiles(sp.rows)
    masks = None
    if phantom is not None:
        from training.select import phantom_lesion_masks

        masks = phantom_lesion_masks(phantom, sp)
    per_model, scores = [], []
    for path in models:
        model = load_model(path, dev)
        syn, _, secs = _run(model, sp.mr, batch_size, dev, quiet, model.version, seed=seed)
        m = score(sp.fusion, syn)
        scores.append(m)
        entry: dict = {"model": model.version, "dir": str(path), "seconds_per_slice": round(secs, 3),
                       **{k: {"mean": float(np.mean(m[k])), "sd": float(np.std(m[k]))} for k in METRICS}}
        entry["uptake_tertiles"] = [
            {"tertile": name, "n": int((labels == lab).sum()),
             **{k: float(np.mean(m[k][labels == lab])) for k in METRICS}}
            for lab, name in ((0, "low"), (1, "middle"), (2, "high")) if (labels == lab).any()]
        entry["spearman_with_uptake"] = {k: spearman(uptake, np.asarray(m[k], np.float64)) for k in METRICS}
        if masks is not None and bool(masks.any()):
            from training.select import uptake_sums

            pred, real = uptake_sums(sp.mr, sp.fusion, syn, masks)
            entry["lesion_uptake_shown"] = pred / real if real > 0 else None
        per_model.append(entry)
    comparisons = []
    for j in range(1, len(models)):
        rows = {}
        for k in METRICS:
            mean, lo, hi = bootstrap_ci(np.asarray(scores[j][k]) - np.asarray(scores[0][k]), patients, draws, seed)
            rows[k] = {"difference": mean, "ci95": [lo, hi], "verdict": verdict(k, lo, hi)}
        comparisons.append({"a": per_model[0]["model"], "b": per_model[j]["model"], "metrics": rows,
                            "verdict": verdict_line(per_model[j]["model"], per_model[0]["model"], rows)})
    summary = {"split": split, "slices": len(sp), "patients": len(set(patients)), "seed": seed,
               "bootstrap": {"draws": draws, "resampled": "patients", "interval": "percentile 95 %"},
               "uptake_tertile_cuts": cuts, "models": per_model, "comparisons": comparisons,
               "data": {"counts": sp.manifest.get("counts"), "source": sp.manifest.get("source")},
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    (out / "compare.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "compare.md").write_text(markdown(summary))
    figure(summary, out / "compare.png")
    return summary


def verdict_line(b: str, a: str, rows: dict) -> str:
    """The plain sentence: "B is better than A on ..., worse on ..., indistinguishable on ..."."""
    by = {v: [k.upper() for k, r in rows.items() if r["verdict"] == v] for v in ("better", "worse", "indistinguishable")}
    parts = [f"{word} {a} on {', '.join(by[v])}" for v, word in (("better", "better than"), ("worse", "worse than"))
             if by[v]]
    if by["indistinguishable"]:
        parts.append(f"indistinguishable{'' if parts else ' from ' + a} on {', '.join(by['indistinguishable'])}")
    return f"{b} is " + "; ".join(parts) + " (95 % intervals, bootstrap over patients)."


def _num(v: float | None, k: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return {"psnr": f"{v:.2f}", "mse": f"{v:.2e}"}.get(k, f"{v:.4f}")


def markdown(s: dict) -> str:
    lines = [f"# Model comparison on the {s['split']} split", "",
             f"{s['slices']} slices of {s['patients']} patients; 95 % intervals by paired bootstrap over patients "
             f"({s['bootstrap']['draws']} draws)."
             + (" With fewer than 10 patients the intervals are too narrow to trust." if s["patients"] < 10 else ""),
             "",
             "| model | " + " | ".join(f"{k.upper()}" for k in METRICS) + " | s/slice |",
             "|---|" + "---|" * (len(METRICS) + 1)]
    for m in s["models"]:
        lines.append(f"| {m['model']} | " + " | ".join(f"{_num(m[k]['mean'], k)} ± {_num(m[k]['sd'], k)}"
                                                        for k in METRICS) + f" | {m['seconds_per_slice']} |")
    for c in s["comparisons"]:
        lines += ["", f"## {c['b']} − {c['a']}", "", "| metric | difference | 95 % interval | |", "|---|---|---|---|"]
        for k, r in c["metrics"].items():
            lo, hi = r["ci95"]
            lines.append(f"| {k.upper()} | {_num(r['difference'], k)} | {_num(lo, k)} to {_num(hi, k)} | {r['verdict']} |")
        lines += ["", f"**{c['verdict']}**"]
    lines += ["", "## By uptake tertile", "", "| model | tertile | n | PSNR | SSIM | MAE | MSE |",
              "|---|---|---|---|---|---|---|"]
    for m in s["models"]:
        for t in m["uptake_tertiles"]:
            lines.append(f"| {m['model']} | {t['tertile']} | {t['n']} | " + " | ".join(_num(t[k], k) for k in METRICS) + " |")
    lines += ["", "Spearman correlation of each metric with the lesion uptake (SUVmax):", ""]
    for m in s["models"]:
        rho = m["spearman_with_uptake"]
        lines.append(f"- {m['model']}: " + ", ".join(f"{k.upper()} {_num(rho[k], 'ssim')}" for k in METRICS))
    if any("lesion_uptake_shown" in m for m in s["models"]):
        lines += ["", "Uptake shown inside the lesion masks: " + ", ".join(
            f"{m['model']} {m['lesion_uptake_shown']:.0%}" for m in s["models"] if m.get("lesion_uptake_shown") is not None)]
    lines += ["", "![differences with 95 % intervals](compare.png)"]
    return "\n".join(lines) + "\n"


def figure(s: dict, path: Path) -> Path:
    """One panel per metric: each B − A difference with its 95 % interval, drawn around zero and
    written out in numbers (PIL only)."""
    from PIL import Image, ImageDraw

    width, row, left, right = 840, 26, 190, 250
    comps = s["comparisons"]
    height = 30 + len(METRICS) * (len(comps) * row + 30)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    span = width - left - right
    y = 10
    for k in METRICS:
        extent = max([abs(v) for c in comps for v in (*c["metrics"][k]["ci95"], c["metrics"][k]["difference"])]
                     + [1e-12])
        scale, zero = span / 2 / extent, left + span / 2
        draw.text((10, y), f"{k.upper()} difference ({'higher' if HIGHER_IS_BETTER[k] else 'lower'} is better); "
                           f"axis ±{_num(extent, k)}", fill="black")
        y += 16
        draw.line([(zero, y), (zero, y + len(comps) * row)], fill="grey")
        for c in comps:
            r = c["metrics"][k]
            lo, hi = (zero + v * scale for v in r["ci95"])
            mid = zero + r["difference"] * scale
            colour = {"better": (0, 130, 0), "worse": (200, 0, 0)}.get(r["verdict"], (90, 90, 90))
            name = c["b"] if len(c["b"]) <= 28 else "…" + c["b"][-27:]
            draw.text((10, y + 6), name, fill="black")
            draw.line([(lo, y + 12), (hi, y + 12)], fill=colour, width=3)
            draw.ellipse([(mid - 4, y + 8), (mid + 4, y + 16)], fill=colour)
            a, b = r["ci95"]
            draw.text((width - right + 10, y + 6), f"{_num(r['difference'], k)} [{_num(a, k)}, {_num(b, k)}] {r['verdict']}",
                      fill=colour)
            y += row
        y += 14
    img.save(path)
    return path


def write_comparison(model_dir: str | Path, summary: dict, report: Path) -> None:
    """Put the comparison's summary into a model's card (`comparison`)."""
    card = read_card(model_dir)
    card["comparison"] = {"split": summary["split"], "slices": summary["slices"], "patients": summary["patients"],
                          "verdicts": [c["verdict"] for c in summary["comparisons"]],
                          "models": [{"model": m["model"], **{k: m[k]["mean"] for k in METRICS}} for m in summary["models"]],
                          "differences": summary["comparisons"], "report": str(report), "created": summary["created"]}
    write_card(model_dir, card)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m training compare", description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--data", required=True, help="paired data set directory")
    ap.add_argument("--model", action="append", required=True, help="model folder; give two or more, the first is A")
    ap.add_argument("--out", required=True, help="writes compare.json, compare.md, compare.png")
    ap.add_argument("--split", default="test", choices=["train", "val", "test"])
    ap.add_argument("--seed", type=int, default=0, help="sampler and bootstrap seed")
    ap.add_argument("--draws", type=int, default=2000, help="bootstrap draws")
    ap.add_argument("--phantom", help="the phantom export the data set was built from: uptake inside the lesion masks")
    ap.add_argument("--limit", type=int, help="at most this many (evenly spread) pairs")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--write-card", action="store_true", help="put the summary into the last model's card")
    a = ap.parse_args(argv)
    try:
        s = compare(a.model, a.data, a.out, split=a.split, seed=a.seed, draws=a.draws, device=a.device,
                    batch_size=a.batch_size, limit=a.limit, phantom=a.phantom, threads=a.threads)
    except ValueError as exc:
        print(f"compare: {exc}")
        return 2
    if a.write_card:
        write_comparison(a.model[-1], s, Path(a.out) / "compare.md")
    print((Path(a.out) / "compare.md").read_text())
    return 0
