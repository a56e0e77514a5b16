"""`python -m training calibrate-gate`: calibrate a model folder's safety gate on a paired data set.

The input gate's statistics come from the training split (every slice, grouped by series), its
thresholds from the validation split (margin x the largest validation series' distance); the
output check's ranges from the training split's real fusions. With `--check-outputs N` the model
then synthesises N validation series and the card records how many pass the output check. Writes
`gate.safetensors` and the card's `gate` block (dicomnode.infer.gate); the rest of the folder is
untouched. Run it again whenever the generator changes (`finetune` does).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dicomnode.infer import gate as g
from dicomnode.infer.grid import rgb_to_unit
from dicomnode.infer.model import load_model, read_card, write_card

log = logging.getLogger(__name__)

# Thresholds = margin x the largest validation series' value: features, statistics, ghosting. Chosen on
# a development phantom seed (3100): every in-distribution series 20 % or more below each threshold.
INPUT_MARGINS = (1.5, 2.0, 1.25)
OUTPUT_MARGIN = 1.5


def series_indices(data: Path, split: str) -> list[list[int]]:
    """The data set's slices of one split, grouped by MR series, in file order."""
    groups: dict[str, list[int]] = defaultdict(list)
    with open(data / "pairs.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["split"] == split:
                groups[row["mr_series_uid"]].append(int(row["index"]))
    return list(groups.values())


def _opacity(card: dict, manifest: dict) -> float:
    if card.get("output"):
        return float(card["output"]["opacity"])
    return float(manifest.get("render", {}).get("opacity", 0.5))


def calibrate(model_dir: str | Path, data: str | Path, *, input_margins: tuple[float, float, float] = INPUT_MARGINS,
              output_margin: float = OUTPUT_MARGIN, check_outputs: int = 0, command: str = "") -> dict:
    """Calibrate and write the gate; returns the card's `gate` block."""
    model_dir, data = Path(model_dir), Path(data)
    manifest = json.loads((data / "manifest.json").read_text())
    model = load_model(model_dir, "cpu")
    mr = np.load(data / "mr.npy", mmap_mode="r")
    fusion = np.load(data / "fusion.npy", mmap_mode="r")
    train, val = series_indices(data, "train"), series_indices(data, "val")
    if len(train) < 10 or len(val) < 3:
        raise ValueError(f"{data}: {len(train)} training and {len(val)} validation series; the gate needs at least "
                         "10 and 3")

    def mr_of(ix: list[int]) -> torch.Tensor:
        return torch.from_numpy(np.asarray(mr[ix], dtype=np.float32))

    t0 = time.perf_counter()
    gate, spread = g.fit(model.generator, [mr_of(ix) for ix in train], [mr_of(ix) for ix in val], input_margins)
    opacity = _opacity(model.card, manifest)
    real = torch.stack([g.output_stats(torch.from_numpy(np.stack([rgb_to_unit(f) for f in fusion[ix]])), mr_of(ix),
                                       opacity) for ix in train])
    gate.output_low, gate.output_high = g.output_bounds(real, output_margin)
    gate.opacity = opacity
    seconds = time.perf_counter() - t0
    info: dict = {
        "calibrated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": {"source": manifest.get("source"), "seed": manifest.get("seed"), "train_series": len(train),
                 "train_slices": sum(map(len, train)), "val_series": len(val)},
        "thresholds": f"input: {' / '.join(map(str, input_margins))} x the largest of {len(val)} validation series' "
                      "features / statistics / ghosting; output: the training split's real fusions, widened "
                      f"{output_margin} x",
        "distances": spread,
        "seconds": round(seconds, 1),
    }
    if command:
        info["command"] = command
    if check_outputs:
        info["val_output_check"] = _check_outputs(model, gate, [mr_of(ix) for ix in val[:check_outputs]])
    block = g.save_gate(model_dir, gate, info)
    card = read_card(model_dir)
    card["gate"] = block
    write_card(model_dir, card)
    return block


def _check_outputs(model, gate: g.Gate, series: list[torch.Tensor]) -> dict:
    """Synthesise validation series with the card's sampler and count the output check's passes."""
    passed, failures = 0, []
    for i, batch in enumerate(series):
        out = model.translate(batch, seed=i).rgb.float()
        check = gate.check_output(out, batch)
        passed += check.passed
        failures += list(check.failures)
    return {"series": len(series), "passed": passed, "failures": failures[:10]}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training calibrate-gate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model folder to calibrate (model.json, weights)")
    ap.add_argument("--data", required=True, help="the paired data set it was trained on (dicomnode-paired/1)")
    ap.add_argument("--input-margins", type=float, nargs=3, default=INPUT_MARGINS, metavar=("FEATURES", "STATISTICS", "GHOSTING"),
                    help="each threshold = its margin x the largest validation series' value (default: %(default)s)")
    ap.add_argument("--output-margin", type=float, default=OUTPUT_MARGIN)
    ap.add_argument("--check-outputs", type=int, default=0, metavar="N",
                    help="also synthesise N validation series and record the output check's pass rate")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python -m training calibrate-gate " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        block = calibrate(args.model, args.data, input_margins=tuple(args.input_margins), output_margin=args.output_margin,
                          check_outputs=args.check_outputs, command=command)
    except (OSError, ValueError) as exc:
        print(f"calibrate-gate: {exc}", file=sys.stderr)
        return 2
    keys = ("feature_threshold", "stats_threshold", "ghost_threshold", "output_low", "output_high", "distances", "data",
            "seconds")
    print(json.dumps({k: block[k] for k in keys}, indent=1))
    if "val_output_check" in block:
        print("validation outputs:", json.dumps(block["val_output_check"]))
    return 0
