"""Ray backend: how throughput scales with the number of model actors, and what the Ray path costs
per job compared with the local inference process.

This machine has 2 cores, so a real model cannot show scaling. The actors here run a processor of
fixed service time instead (`SleepProcessor`: it sleeps --ms per slice, then returns a derived copy
of each slice), labelled as such in the output: the numbers measure the node's scheduling, the
object-store transfers and the encoding round trip, not a GPU.

    python bench/bench_ray.py                 # 1, 2, 4, 8 actors; 16 series of 10 slices, 20 ms/slice
    python bench/bench_ray.py --actors 1 2 --jobs 8
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(Path(__file__).resolve().parent)]

from pydicom import dcmread  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from dicomnode.config import InferenceConfig  # noqa: E402
from dicomnode.engine import InferenceRequest  # noqa: E402
from dicomnode.localengine import InferenceProcess  # noqa: E402
from dicomnode.records import ProcessResult  # noqa: E402
from tests.support.dicomfactory import make_series  # noqa: E402


class SleepProcessor:
    """A stand-in model of fixed service time: `ms` per slice, then one derived copy per slice."""

    name = "sleep-stand-in"

    def __init__(self, ms: float):
        self.ms = ms

    def process(self, series, datasets):
        time.sleep(self.ms / 1000 * len(datasets))
        out = []
        for ds in datasets:
            new = copy.deepcopy(ds)
            new.SeriesInstanceUID = generate_uid(entropy_srcs=["bench", series.series_instance_uid])
            new.SOPInstanceUID = generate_uid(entropy_srcs=["bench", str(ds.SOPInstanceUID)])
            out.append(new)
        return ProcessResult(out, {"infer": self.ms / 1000 * len(datasets)})


def requests(work: Path, jobs: int, slices: int, size: int) -> list[InferenceRequest]:
    out = []
    for k in range(jobs):
        files = make_series(work / "in" / f"s{k}", slices=slices, rows=size, cols=size, seed=k)
        ds = dcmread(files[0], stop_before_pixels=True)
        out.append(InferenceRequest(k + 1, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                  tuple(map(str, files)), str(work / "out" / f"job{k + 1}")))
    return out


def run_all(engine, reqs: list[InferenceRequest], parallel: int) -> float:
    for r in reqs:
        shutil.rmtree(r.out_dir, ignore_errors=True)
        Path(r.out_dir).mkdir(parents=True)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        results = list(pool.map(lambda r: engine.run(r, timeout=600), reqs))
    assert all(res["outputs"] == len(r.paths) for res, r in zip(results, reqs))
    return time.perf_counter() - t0


def ray_engine(actors: int, processor):
    from dicomnode.cluster import RayEngine

    inference = InferenceConfig(backend="ray", ray_address="local", ray_actors=actors, ray_cpus_per_actor=0.25)
    engine = RayEngine(processor, inference)
    engine.start(wait_ready=True)
    assert engine.ready, engine.status()
    return engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--jobs", type=int, default=16)
    ap.add_argument("--slices", type=int, default=10)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--ms", type=float, default=20.0, help="stand-in service time per slice")
    ap.add_argument("--overhead-jobs", type=int, default=20)
    args = ap.parse_args()
    # Ray's workers import this module to unpickle SleepProcessor: they inherit the environment.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent), str(ROOT),
                                                os.environ.get("PYTHONPATH", "")])
    import ray

    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    try:
        reqs = requests(work, args.jobs, args.slices, args.size)
        service = args.ms / 1000 * args.slices
        print(f"{args.jobs} series x {args.slices} slices of {args.size}^2; stand-in processor: "
              f"{args.ms:g} ms per slice ({service:.2f} s per series), {os.cpu_count()} CPUs")
        print(f"{'actors':>6} {'seconds':>8} {'series/s':>9} {'speed-up':>9} {'ideal':>6}")
        base = None
        for n in args.actors:
            engine = ray_engine(n, SleepProcessor(args.ms))
            try:
                run_all(engine, reqs[:n], n)  # warm: every actor has run once
                t = run_all(engine, reqs, n)
            finally:
                engine.stop()
            base = base or t * args.actors[0]
            ideal = min(n, args.jobs)
            print(f"{n:>6} {t:8.2f} {args.jobs / t:9.2f} {base / t:9.2f} {ideal:6d}")

        # per-job cost of the path itself: a processor that takes no time, one job at a time
        zero = SleepProcessor(0.0)
        one = reqs[:1] * args.overhead_jobs
        local = InferenceProcess(zero)
        local.start()
        try:
            run_all(local, one[:2], 1)
            t_local = [run_all(local, [r], 1) for r in one]
        finally:
            local.stop()
        engine = ray_engine(1, zero)
        try:
            run_all(engine, one[:2], 1)
            t_ray = [run_all(engine, [r], 1) for r in one]
        finally:
            engine.stop()
        ml, mr = statistics.median(t_local) * 1000, statistics.median(t_ray) * 1000
        print(f"per-job overhead, {args.slices} slices of {args.size}^2, zero-time processor, median of "
              f"{args.overhead_jobs}: local inference process {ml:.0f} ms, Ray actor {mr:.0f} ms ({mr / ml:.1f}x)")
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
