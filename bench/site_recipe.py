"""The small-data fine-tuning recipe, chosen on validation: how many steps for a site with 20, 50
or 200 training studies.

    python bench/site_recipe.py --data DS --init models/t2fs2petfusion --work runs/recipe \\
        --runs 20:1000,50:1000,200:1000,20:300,50:2000,200:2000 --val-limit 128 --threads 1 \\
        [--phantom EXPORT] [--test]

For a run `n:s`, the first n studies of the data set's train split in a seeded order (nested: the
20 are among the 50, the 50 among the 200) form a derived data set (the same arrays; pairs.csv
with the other train rows marked `unused`, the manifest's counts those of the subset), and
`finetune` starts from INIT with s generator and s cDDPM steps at the default learning rates.
Each model is scored on the val split (at most --val-limit evenly spread slices, the same for
every model) against INIT with `compare`'s paired bootstrap over patients. WORK/results.json
and WORK/results.md are rewritten after every run, and finished runs are not run again.

--test scores, once, the run chosen for each size on val (`pick`) on the test split (all of it, or
--test-limit evenly spread slices).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicomnode.infer.model import load_model  # noqa: E402
from training.compare import bootstrap_ci  # noqa: E402
from training.evaluate import METRICS, _run, score  # noqa: E402
from training.finetune import RECIPE, finetune  # noqa: E402
from training.trainutil import load_split  # noqa: E402


def subset(data: Path, n: int, out: Path, seed: int = 0) -> dict:
    """The derived data set of the first n train studies (seeded order); returns its counts."""
    rows = list(csv.DictReader(open(data / "pairs.csv", newline="")))
    studies = sorted({r["study_uid"] for r in rows if r["split"] == "train"})
    if n > len(studies):
        raise SystemExit(f"{data}: the train split has {len(studies)} studies, fewer than {n}")
    keep = {studies[i] for i in np.random.default_rng(seed).permutation(len(studies))[:n]}
    for r in rows:
        if r["split"] == "train" and r["study_uid"] not in keep:
            r["split"] = "unused"
    out.mkdir(parents=True, exist_ok=True)
    for name in ("mr.npy", "fusion.npy"):
        if not (out / name).exists():
            os.symlink((data / name).resolve(), out / name)
    with open(out / "pairs.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    manifest = json.loads((data / "manifest.json").read_text())
    used = [r for r in rows if r["split"] != "unused"]
    counts = {"pairs": len(used), "patients": len({r["patient_id"] for r in used}),
              "studies": len({r["study_uid"] for r in used}),
              **{sp: sum(1 for r in used if r["split"] == sp) for sp in ("train", "val", "test")},
              "train_studies": n, "train_patients": len({r["patient_id"] for r in used if r["split"] == "train"})}
    manifest["counts"] = counts
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return counts


def scores_of(model_dir: Path, sp, masks, cache: Path, threads: int) -> dict[str, np.ndarray]:
    if cache.exists():
        z = np.load(cache)
        return {k: z[k] for k in METRICS}
    torch.set_num_threads(threads)
    model = load_model(model_dir, torch.device("cpu"))
    syn, _, _ = _run(model, sp.mr, 4, torch.device("cpu"), True, model.version)
    m = score(sp.fusion, syn)
    extra = {}
    if masks is not None and bool(masks.any()):
        from training.select import uptake_sums

        pred, real = uptake_sums(sp.mr, sp.fusion, syn, masks)
        extra["lesion_shown"] = np.array(pred / real if real > 0 else np.nan)
    np.savez(cache, **{k: np.asarray(m[k]) for k in METRICS}, **extra)
    return {k: np.asarray(m[k]) for k in METRICS}


def lesion_shown(cache: Path) -> float | None:
    z = np.load(cache)
    return float(z["lesion_shown"]) if "lesion_shown" in z.files and np.isfinite(z["lesion_shown"]) else None


def row(name: str, scores: dict, base: dict, patients: list[str], cache: Path) -> dict:
    r: dict = {"run": name, **{k: float(np.mean(scores[k])) for k in METRICS}, "lesion_shown": lesion_shown(cache)}
    for k in METRICS:
        mean, lo, hi = bootstrap_ci(scores[k] - base[k], patients)
        r[f"d_{k}"] = [mean, lo, hi]
    return r


def pick(runs: list[dict], rule: str = "psnr+lesion") -> dict:
    """The run chosen on val: the best PSNR; with "psnr+lesion", of the runs within 0.1 dB of the
    best PSNR (closer than val can tell apart), the one whose lesion uptake shown is nearest 100 %
    (the synthetic image must show the infected disc, neither fainter nor hotter)."""
    best = max(runs, key=lambda r: r["psnr"])
    if rule == "psnr":
        return best
    close = [r for r in runs if r["psnr"] >= best["psnr"] - 0.1]
    return min(close, key=lambda r: abs((r.get("lesion_shown") or 1.0) - 1.0))


def markdown(res: dict) -> str:
    out = [f"# Fine-tuning recipes on the val split ({res['val']['slices']} slices, {res['val']['patients']} patients)",
           "", "| run | train studies / patients / slices | PSNR | SSIM | MAE | ΔPSNR (95 % interval) | lesion shown | minutes |",
           "|---|---|---|---|---|---|---|---|"]
    for r in [res["start"], *res["runs"]]:
        c = r.get("counts", {})
        d = r.get("d_psnr")
        out.append(f"| {r['run']} | {c.get('train_studies', '')} / {c.get('train_patients', '')} / {c.get('train', '')} "
                   f"| {r['psnr']:.2f} | {r['ssim']:.4f} | {r['mae']:.4f} | "
                   + (f"{d[0]:+.2f} ({d[1]:+.2f} to {d[2]:+.2f})" if d else "") + " | "
                   + (f"{100 * r['lesion_shown']:.0f} %" if r.get("lesion_shown") is not None else "") + " | "
                   + (f"{r['minutes']:.1f}" if "minutes" in r else "") + " |")
    for t in res.get("test", []):
        d = t["d_psnr"]
        out.append(f"\nTest ({t['slices']} slices, {t['patients']} patients), {t['run']} against the starting model: "
                   f"PSNR {t['start_psnr']:.2f} -> {t['psnr']:.2f}, difference {d[0]:+.2f} ({d[1]:+.2f} to {d[2]:+.2f}); "
                   f"SSIM {t['start_ssim']:.4f} -> {t['ssim']:.4f}; MAE {t['start_mae']:.4f} -> {t['mae']:.4f}.")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--init", required=True, type=Path)
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--runs", default="20:1000,50:1000,200:1000,20:300,50:2000,200:2000")
    ap.add_argument("--val-limit", type=int, default=128)
    ap.add_argument("--phantom", type=Path, help="the phantom export: uptake shown inside the lesion masks")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--test", action="store_true", help="score the chosen run per size on the test split, once")
    ap.add_argument("--test-limit", type=int, help="at most this many evenly spread test slices")
    ap.add_argument("--pick", choices=["psnr", "psnr+lesion"], default="psnr+lesion",
                    help="how the run of each size is chosen on val (see pick)")
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    res_path = a.work / "results.json"
    res = json.loads(res_path.read_text()) if res_path.exists() else {"runs": []}

    def load(split: str, limit: int | None):
        sp = load_split(a.data, split, limit)
        masks = None
        if a.phantom is not None:
            from training.select import phantom_lesion_masks

            masks = phantom_lesion_masks(a.phantom, sp)
        return sp, masks, [r["patient_id"] for r in sp.rows]

    val, vmasks, patients = load("val", a.val_limit)
    res["val"] = {"slices": len(val), "patients": len(set(patients)), "limit": a.val_limit}
    base = scores_of(a.init, val, vmasks, a.work / "start-val.npz", a.threads)
    res["start"] = {"run": f"start ({a.init.name})", **{k: float(np.mean(base[k])) for k in METRICS},
                    "lesion_shown": lesion_shown(a.work / "start-val.npz")}
    done = {r["run"] for r in res["runs"]}

    def save():
        res_path.write_text(json.dumps(res, indent=1) + "\n")
        (a.work / "results.md").write_text(markdown(res))

    save()
    for spec in a.runs.split(","):
        n, steps = (int(x) for x in spec.split(":"))
        name = f"{n} studies, {steps}+{steps} steps"
        if name in done:
            continue
        data = a.work / f"data-{n}"
        counts = subset(a.data, n, data)
        run = a.work / f"run-{n}-{steps}"
        t0 = time.perf_counter()
        if not (run / "model" / "model.json").exists():
            finetune(a.init, data, run, pix2pix_steps=steps, cddpm_steps=steps, threads=a.threads, device="cpu",
                     quiet=True)
        minutes = (time.perf_counter() - t0) / 60
        s = scores_of(run / "model", val, vmasks, run / "val.npz", a.threads)
        res["runs"].append({**row(name, s, base, patients, run / "val.npz"), "counts": counts, "steps": steps,
                            "lr": [RECIPE.pix2pix_lr, RECIPE.cddpm_lr], "minutes": minutes})
        save()
        print(markdown(res).splitlines()[-1], flush=True)
    if a.test:
        test, tmasks, tpat = load("test", a.test_limit)
        tbase = scores_of(a.init, test, tmasks, a.work / "start-test.npz", a.threads)
        res["test"] = []
        for n in sorted({r["counts"]["train_studies"] for r in res["runs"]}):
            best = pick([r for r in res["runs"] if r["counts"]["train_studies"] == n], a.pick)
            run = a.work / f"run-{n}-{best['steps']}"
            s = scores_of(run / "model", test, tmasks, run / "test.npz", a.threads)
            t = row(best["run"], s, tbase, tpat, run / "test.npz")
            t.update({"slices": len(test), "patients": len(set(tpat)),
                      **{f"start_{k}": float(np.mean(tbase[k])) for k in METRICS},
                      "start_lesion_shown": lesion_shown(a.work / "start-test.npz")})
            res["test"].append(t)
        save()
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
