"""What a reader could exploit without looking at anatomy: a scripted observer on a reader study.

Creates (or reuses, under --work) a reader study from a paired data set and a model, then answers
it as a "reader" that sees only image statistics of each served PNG, through the study's own
HTTP API. For each statistic below, the observer knows half the items are synthetic and calls
the half on one side of the statistic's median synthetic (the side fixed in advance, noted
below); the report then scores it like any reader. Also printed: each statistic's ROC AUC for
synthetic against real, from the key (the separability any threshold could reach).

- `pet_share`: mean PET colour of the image (the fusion minus its grey, as the gate measures it);
  guess: synthetic above the median (the model paints lesions hot);
- `fine_texture`: mean absolute difference of the image from its 3 x 3 mean (noise and texture);
  guess: synthetic below the median (a mean of K samples is smoother than a real PET).

    python bench/bench_reader_observer.py --data DS2027 --model models/t2fs2petfusion --items 100 \
        --work /tmp/reader-2027
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import uniform_filter

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]  # the training code; bench_reader

from bench_reader import _port, serve  # noqa: E402
from scipy.stats import mannwhitneyu  # noqa: E402

from training.reader.report import report  # noqa: E402
from training.reader.study import add_reader, create  # noqa: E402


def statistics(png: bytes) -> dict[str, float]:
    """The observer's two numbers for one served image. PET colour: each channel's excess over the
    blue one (the 'hot' map adds blue only at its very top, so blue is about the grey share)."""
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), np.float32) / 255
    pet = np.clip(rgb - rgb[..., 2:3], 0, 1)
    fine = np.abs(rgb - uniform_filter(rgb, size=(3, 3, 1))).mean()
    return {"pet_share": float(pet.mean()), "fine_texture": float(fine)}


SIDES = {"pet_share": "above", "fine_texture": "below"}


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    study, key = a.work / "study", a.work / "key.json"
    if not (study / "study.sqlite").exists():
        create(a.data, a.model, study, key, items=a.items, readers=["nobody"], seed=5, split="test")
    tokens = {name: add_reader(study, f"observer-{name}-{time.time_ns()}", repeats=0, seed=9) for name in SIDES}
    port = _port()
    server = serve(study, port)
    truth = {k: v["truth"] for k, v in json.loads(key.read_text())["items"].items()}
    seen: dict[str, list[float]] = {}
    try:
        for name, token in tokens.items():
            base = f"http://127.0.0.1:{port}/r/{token}"
            total = json.loads(_get(f"{base}/state"))["total"]
            seen[name] = []
            for position in range(1, total + 1):  # in order, deciding with the running median (no look ahead)
                value = statistics(_get(f"{base}/image/{position}"))[name]
                seen[name].append(value)
                median = float(np.median(seen[name]))
                synthetic = value > median if SIDES[name] == "above" else value < median
                body = json.dumps({"position": position, "answer": "synthetic" if synthetic else "real",
                                   "confidence": 3}).encode()
                urllib.request.urlopen(urllib.request.Request(f"{base}/answer", data=body,
                                                              headers={"Content-Type": "application/json"}), timeout=10)
    finally:
        server.terminate()
    rep = report(study, key, a.work / "report")
    result: dict = {"items": a.items, "command": " ".join(sys.argv)}
    for name in tokens:
        reader = next(r for r in rep["readers"] if r.startswith(f"observer-{name}-"))
        s = rep["readers"][reader]
        sign = 1.0 if SIDES[name] == "above" else -1.0
        kinds = [truth[f] for f in _files(study, reader)]
        pos = [sign * v for v, k in zip(seen[name], kinds) if k == "synthetic"]
        neg = [sign * v for v, k in zip(seen[name], kinds) if k == "real"]
        result[name] = {"accuracy": s["accuracy"], "p_value_vs_50": s["p_value_vs_50"],
                        "auc_of_statistic": float(mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg))),
                        "real_median": float(np.median(neg)) * sign, "synthetic_median": float(np.median(pos)) * sign}
        acc = s["accuracy"]
        print(f"{name}: accuracy {100 * acc['value']:.1f} % ({acc['k']}/{acc['n']}, 95 % CI {100 * acc['ci95'][0]:.1f}-"
              f"{100 * acc['ci95'][1]:.1f}), p vs 50 % {s['p_value_vs_50']:.3g}; AUC of the statistic "
              f"{result[name]['auc_of_statistic']:.3f} (median real {result[name]['real_median']:.4f}, synthetic "
              f"{result[name]['synthetic_median']:.4f})")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")


def _files(study: Path, reader: str) -> list[str]:
    import sqlite3

    db = sqlite3.connect(study / "study.sqlite")
    return [r[0] for r in db.execute("SELECT i.file FROM worklist w JOIN items i ON i.id = w.item_id JOIN readers r ON "
                                     "r.id = w.reader_id WHERE r.name = ? ORDER BY w.position", (reader,))]


if __name__ == "__main__":
    main()
