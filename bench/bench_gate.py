"""The input gate and output check against phantom series the model was never trained for.

For one seed it writes (or reuses, under --work) one phantom cohort per kind: in distribution
(sagittal T2FS) and each of the phantom's out-of-distribution contents under a T2FS header (T1,
STIR, T2 without fat suppression, noise, motion ghosting, coil inhomogeneity, another region).
The same seed gives the same patients in every kind, so the kinds differ only in their pixels.
Every series goes through the node's own preparation and the model's calibrated gate; reported:
the in-distribution pass rate, per kind the share caught (score > 1) and the ROC AUC of the score
against in distribution, and the cost per series (the gate's seconds against the synthesis').
With --synthesize K, K series per kind are also synthesised: the output check's verdict and the
PSNR against the phantom's real fusion show what the model makes of each kind.

    python bench/bench_gate.py --model models/t2fs2petfusion --seed 3131 --cases 40 --synthesize 6 \
        --work /tmp/gate-3131 --json gate.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import torch

from dicomnode.infer.gate import load_gate
from dicomnode.infer.grid import rgb_to_unit
from dicomnode.infer.model import load_model
from dicomnode.infer.preprocess import prepare_series
from dicomnode.tools.imagemetrics import psnr
from dicomnode.tools.phantom.generate import CONTENTS, generate

KINDS = ("in-distribution",) + CONTENTS


def auc(negatives: list[float], positives: list[float]) -> float:
    """ROC AUC of 'positive scores higher' (Mann-Whitney, ties count one half)."""
    neg, pos = np.asarray(negatives), np.asarray(positives)
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def cohort(work: Path, kind: str, cases: int, seed: int) -> list[Path]:
    folder = work / kind
    if not (folder / "cases.json").is_file():
        generate(folder, cases, seed, pet_grid="mr", content="" if kind == "in-distribution" else kind)
    return sorted(p for p in folder.iterdir() if (p / "MR").is_dir())


def real_fusion(case: Path, prepared) -> torch.Tensor:
    """The phantom's fusion of each prepared MR slice, on the model grid, (S, 3, G, G) in [0, 1]."""
    by_source = {}
    for f in (case / "FUSION").glob("*.dcm"):
        ds = pydicom.dcmread(f)
        by_source[ds.SourceImageSequence[0].ReferencedSOPInstanceUID] = ds.pixel_array
    out = [place.to_grid(rgb_to_unit(by_source[ds.SOPInstanceUID]))
           for place, ds in zip(prepared.placements, prepared.datasets)]
    return (torch.from_numpy(np.stack(out)) + 1) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/t2fs2petfusion")
    ap.add_argument("--seed", type=int, default=3131)
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--synthesize", type=int, default=0, metavar="K")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    gate = load_gate(args.model, model.card)
    if gate is None:
        sys.exit(f"{args.model}: no gate in its card; run python -m training calibrate-gate first")
    rows: dict[str, dict] = {}
    for kind in KINDS:
        scores, gate_s, prep_s, synth = [], [], [], []
        for i, case in enumerate(cohort(args.work, kind, args.cases, args.seed)):
            t0 = time.perf_counter()
            prepared = prepare_series(sorted((case / "MR").glob("*.dcm")))
            t1 = time.perf_counter()
            s = gate.score(model.generator, prepared.batch)
            gate_s.append(time.perf_counter() - t1)
            prep_s.append(t1 - t0)
            scores.append(s)
            if i < args.synthesize:
                batch = torch.from_numpy(prepared.batch)
                t2 = time.perf_counter()
                out = model.translate(batch, seed=i).rgb.float()
                seconds = time.perf_counter() - t2
                t3 = time.perf_counter()
                check = gate.check_output(out, batch)
                check_s = time.perf_counter() - t3
                value = float(psnr(real_fusion(case, prepared), (out + 1) / 2).mean())
                synth.append({"seconds": seconds, "check_seconds": check_s, "slices": len(prepared),
                              "output_passed": check.passed, "psnr": value, "failures": list(check.failures)})
        row = {"series": len(scores), "score": [s.score for s in scores],
               "passed": sum(s.passed for s in scores), "gate_seconds_median": float(np.median(gate_s)),
               "prepare_seconds_median": float(np.median(prep_s)),
               "worst": {k: sum(s.worst == k for s in scores if not s.passed) for k in {s.worst for s in scores}}}
        if synth:
            row["synthesis"] = {"series": len(synth), "output_passed": sum(x["output_passed"] for x in synth),
                                "psnr_mean": round(float(np.mean([x["psnr"] for x in synth])), 2),
                                "seconds_median": float(np.median([x["seconds"] for x in synth])),
                                "check_seconds_median": float(np.median([x["check_seconds"] for x in synth])),
                                "slices_median": float(np.median([x["slices"] for x in synth])),
                                "failures": [f for x in synth for f in x["failures"]][:6]}
        rows[kind] = row
        print(f"{kind:16s} n={row['series']:3d} passed {row['passed']:3d}  score median "
              f"{np.median(row['score']):.2f}  gate {row['gate_seconds_median']:.2f} s"
              + (f"  synth {row['synthesis']['seconds_median']:.1f} s, output passed "
                 f"{row['synthesis']['output_passed']}/{row['synthesis']['series']}, PSNR {row['synthesis']['psnr_mean']}"
                 if synth else ""), flush=True)
    ind = rows["in-distribution"]["score"]
    for kind in CONTENTS:
        rows[kind]["caught"] = rows[kind]["series"] - rows[kind]["passed"]
        rows[kind]["auc"] = round(auc(ind, rows[kind]["score"]), 4)
    result = {"command": " ".join(sys.argv), "model": model.version, "seed": args.seed, "threads": args.threads,
              "cpu": platform.processor() or platform.machine(), "gate": {k: model.card["gate"][k] for k in
                                                                       ("feature_threshold", "stats_threshold")},
              "kinds": rows}
    print("\n| kind | series | passed | caught | AUC vs in-distribution |\n|---|---|---|---|---|")
    for kind, row in rows.items():
        caught = row.get("caught")
        print(f"| {kind} | {row['series']} | {row['passed']} ({100 * row['passed'] / row['series']:.0f} %) | "
              + (f"{caught} ({100 * caught / row['series']:.0f} %) | {row['auc']:.3f} |" if caught is not None else "| |"))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
