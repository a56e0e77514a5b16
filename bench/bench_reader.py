"""The reader study's server: the time to serve an image, and to store an answer, in a large study.

Creates (or reuses, under --work) a study of --items items from a paired data set and a model,
starts `python -m training reader-study serve` on loopback, and plays one reader through it over
HTTP: per item the state, the image and the answer, each timed. The peer is Python's own static
file server (`python -m http.server`) serving the same images folder: the ratio is the reader
route's median time to the peer's for the same files.

    python bench/bench_reader.py --data DS400 --model models/t2fs2petfusion --items 200 --work /tmp/reader-200
"""

from __future__ import annotations

import argparse
import json
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the training code (python -m training runs from the clone)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen) -> None:
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                sys.exit(f"server did not start: {url}")
            time.sleep(0.1)


def serve(study: Path, port: int) -> subprocess.Popen:
    """`python -m training reader-study serve` for `study` on loopback port `port`, once it answers."""
    proc = subprocess.Popen([sys.executable, "-m", "training", "reader-study", "serve", "--study", str(study),
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    _wait(f"http://127.0.0.1:{port}/reader.css", proc)
    return proc


def _timed(req) -> float:
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=10) as r:
        r.read()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    study, key = a.work / "study", a.work / "key.json"
    if not (study / "study.sqlite").exists():
        from training.reader.study import create

        t0 = time.perf_counter()
        tokens = create(a.data, a.model, study, key, items=a.items, readers=["bench"], seed=1)
        (a.work / "tokens.json").write_text(json.dumps(tokens))
        print(f"created {a.items} items in {time.perf_counter() - t0:.1f} s")
    token = json.loads((a.work / "tokens.json").read_text())["bench"]
    ours, peer = _port(), _port()
    server = serve(study, ours)
    static = subprocess.Popen([sys.executable, "-m", "http.server", str(peer), "--bind", "127.0.0.1", "--directory",
                               str(study / "images")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{ours}/r/{token}"
    try:
        _wait(f"http://127.0.0.1:{peer}/", static)
        db = sqlite3.connect(study / "study.sqlite")
        files = dict(db.execute("SELECT w.position, i.file FROM worklist w JOIN items i ON i.id = w.item_id"))
        done = db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
        times: dict[str, list[float]] = {"state": [], "image": [], "answer": [], "peer_image": []}
        for position in range(done + 1, len(files) + 1):
            times["state"].append(_timed(f"{base}/state"))
            times["image"].append(_timed(f"{base}/image/{position}"))
            times["peer_image"].append(_timed(f"http://127.0.0.1:{peer}/{files[position]}"))
            body = json.dumps({"position": position, "answer": "real", "confidence": 3}).encode()
            times["answer"].append(_timed(urllib.request.Request(f"{base}/answer", data=body,
                                                                 headers={"Content-Type": "application/json"})))
    finally:
        server.terminate()
        static.terminate()
    result = {"items": len(files), "played": len(times["image"]),
              **{f"{k}_ms_median": round(1000 * float(np.median(v)), 2) for k, v in times.items() if v},
              **{f"{k}_ms_p95": round(1000 * float(np.percentile(v, 95)), 2) for k, v in times.items() if v}}
    if times["image"]:
        result["image_vs_peer"] = round(result["image_ms_median"] / result["peer_image_ms_median"], 2)
    print(json.dumps(result, indent=1))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
