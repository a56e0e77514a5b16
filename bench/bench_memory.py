"""Memory of `dicomnode serve`, both processes (not a test; see docs/benchmarks.md).

Starts the real `dicomnode serve` with the shipped model, forwarding to a local storage SCP, and
reads /proc for the node process and its inference process: VmRSS idle (model loaded), VmHWM
(peak, reset just before) while a phantom series (default 20 slices, 512x512) is processed, and
VmRSS after. Nothing is imported from torch here, so this process's own memory does not matter.

    python bench/bench_memory.py [--model default] [--slices 20 --rows 512] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicomnode.scu import echo, store_files  # noqa: E402
from dicomnode.tools.demo import LocalSink, free_port  # noqa: E402
from dicomnode.tools.phantom import write_case  # noqa: E402


def status(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS (needs the same user or root)


def inference_pid(pid: int) -> int:
    """The node's spawned inference process (not multiprocessing's resource tracker)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    spawned = [int(p) for p in out if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
    (child,) = spawned
    return child


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--slices", type=int, default=20)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    sink = LocalSink(work / "sink").start()
    port = free_port()
    (work / "node.toml").write_text(f"""
[node]
port = {port}
storage_dir = "{work / 'node'}"
min_free_disk_mb = 1
[series]
quiet_seconds = 2.0
settle_seconds = 0.2
[metrics]
enabled = false
[inference]
model = "{args.model}"
device = "cpu"
[[destinations]]
name = "sink"
ae_title = "{sink.ae_title}"
host = "127.0.0.1"
port = {sink.port}
""")
    case = write_case(work / "case", 3, rows=args.rows, cols=args.rows, slices=args.slices, lesion=True)
    node = subprocess.Popen([sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(work / "node.toml")],
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while True:
            try:
                if echo("127.0.0.1", port, "DICOMNODE", timeout=2) == 0:
                    break
            except OSError:
                pass
            if time.time() > deadline or node.poll() is not None:
                raise SystemExit("the node did not start")
            time.sleep(0.5)
        time.sleep(2)  # let the start settle
        pids = {"node": node.pid, "inference": inference_pid(node.pid)}
        res = {"model": args.model, "case": f"{args.slices} x {args.rows}x{args.rows}"}
        for name, pid in pids.items():
            res[f"{name}_idle_rss_mib"] = round(status(pid, "VmRSS"))
            reset_peak(pid)
        t0 = time.time()
        report = store_files([Path(p) for p in case["mr"]], "127.0.0.1", port, "DICOMNODE", calling_aet="BENCH")
        assert report.ok, report.failed
        assert sink.wait_for(args.slices, 600), "results did not arrive"
        res["seconds"] = round(time.time() - t0, 1)
        for name, pid in pids.items():
            res[f"{name}_peak_rss_mib"] = round(status(pid, "VmHWM"))
            res[f"{name}_rss_after_mib"] = round(status(pid, "VmRSS"))
    finally:
        node.terminate()
        node.wait(30)
        sink.stop()
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
