"""Network evaluations vs quality for the cDDPM samplers (a benchmark, not a test).

    python bench/bench_sampler.py --model models/t2fs2petfusion --data DATA_DIR --n 4 --threads 1

For n evenly spread test slices: Pix2Pix alone; the full 1000-step ancestral DDPM from pure
noise (the paper-faithful baseline); DDIM and DPM-Solver++(2M) at 50/20/10/4 evaluations from
pure noise and warm-started from the Pix2Pix output; the model card's default (K samples averaged).
Prints a markdown table of PSNR/SSIM against
the real fusion and seconds per slice (batch 1, on this machine), and with --json-out writes it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicomnode.infer.model import load_model  # noqa: E402
from training.evaluate import score, summarise  # noqa: E402
from training.trainutil import load_split  # noqa: E402


def configs(full: bool, strengths: list[float], timesteps: int, defaults: dict):
    yield "pix2pix", dict(refine=False)
    d = {k: defaults[k] for k in ("sampler", "steps", "strength", "samples")}
    yield f"card default ({d['sampler']} {d['steps']} x {d['samples']} @ {d['strength']})", d
    if full:
        yield f"ddpm-{timesteps}", dict(sampler="ddpm", strength=1.0)
    for sampler in ("ddim", "dpmpp2m"):
        for steps in (50, 20, 10, 4):
            yield f"{sampler}-{steps}", dict(sampler=sampler, steps=steps, strength=1.0)
        for s in strengths:
            for steps in (10, 8, 4, 2):
                yield f"{sampler}-{steps} warm {s}", dict(sampler=sampler, steps=steps, strength=s)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=4, help="slices (evenly spread over the split)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-full", action="store_true", help="skip the 1000-step DDPM")
    ap.add_argument("--strengths", default="0.3,0.5", help="warm-start strengths")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.model, args.device)
    split = load_split(args.data, args.split, limit=args.n)
    mr, real = split.mr, split.fusion
    rows = []
    model.translate(mr[:1].to(model.device), steps=2)  # warm-up
    for name, kw in configs(not args.no_full, [float(s) for s in args.strengths.split(",")],
                              model.diffusion.timesteps, model.defaults):
        outs, t0 = [], time.perf_counter()
        for i in range(len(mr)):  # batch 1: the per-slice latency a node sees
            outs.append(model.translate(mr[i:i + 1].to(model.device), seed=args.seed + i, **{"samples": 1, **kw}).rgb.cpu())
        secs = (time.perf_counter() - t0) / len(mr)
        s = summarise(score(real, torch.cat(outs)))
        evals = 0 if not kw.get("sampler") else model.diffusion.timesteps if kw["sampler"] == "ddpm" \
            else kw["steps"] * kw.get("samples", 1)
        rows.append({"config": name, "evals": evals, "psnr": s["psnr"]["mean"], "psnr_sd": s["psnr"]["sd"],
                     "ssim": s["ssim"]["mean"], "ssim_sd": s["ssim"]["sd"], "s_per_slice": secs})
        r = rows[-1]
        print(f"{name:24s} evals {evals:5d}  PSNR {r['psnr']:.3f}  SSIM {r['ssim']:.4f}  {secs:.3f} s/slice", flush=True)
    env = {"device": args.device, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
           "torch": torch.__version__, "model": model.version, "n": len(mr), "split": args.split}
    print(f"\n{env}\n\n| sampler | network evals | PSNR (dB) | SSIM | s/slice |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['evals']} | {r['psnr']:.2f} ± {r['psnr_sd']:.2f} | {r['ssim']:.4f} ± {r['ssim_sd']:.3f} "
              f"| {r['s_per_slice']:.3f} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
