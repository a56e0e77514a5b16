"""`dicomnode demo`: the whole product on loopback in one command.

A Node with the shipped model, a phantom T2FS case sent with the node's own SCU, a local
storage SCP (pynetdicom) as the PACS that receives the synthetic series, PNG previews
(MR | synthetic | the phantom's real PET/T2FS fusion), the job's stage timings and PSNR/SSIM
against the real fusion. Also the engine of bench/bench_e2e.py.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import SecondaryCaptureImageStorage, Verification
from pynetdicom.transport import ThreadedAssociationServer

from dicomnode.config import Config, config_from_dict
from dicomnode.spool import check_uid, write_dataset

SINK_AET = "DEMOSINK"
BANNER_CROP = 0.10  # metrics skip the top 10 % of rows, where the SYNTHETIC banner is burned in


class LocalSink:
    """A minimal storage SCP standing in for the PACS: stores SC images, notes when each arrived."""

    def __init__(self, out_dir: Path, port: int = 0, ae_title: str = SINK_AET, on_received=None):
        self.out_dir, self.ae_title = Path(out_dir), ae_title
        self.port = port or free_port()
        self.on_received = on_received  # called with the path of each stored image
        self.received: list[tuple[float, Path]] = []
        self._cond = threading.Condition()
        self._server: ThreadedAssociationServer | None = None

    def _on_store(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        path = self.out_dir / f"{check_uid(ds.SOPInstanceUID, 'received SOP Instance UID')}.dcm"
        write_dataset(path, ds)
        with self._cond:
            self.received.append((time.time(), path))
            self._cond.notify_all()
        if self.on_received is not None:
            self.on_received(path)
        return 0x0000

    def start(self) -> "LocalSink":
        self.out_dir.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(SecondaryCaptureImageStorage)
        ae.add_supported_context(Verification)
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def wait_for(self, n: int, timeout: float, give_up=lambda: False) -> bool:
        """Wait until `n` images arrived; stop early when `give_up()` says so."""
        deadline = time.time() + timeout
        with self._cond:
            while len(self.received) < n and time.time() < deadline and not give_up():
                self._cond.wait(0.1)
            return len(self.received) >= n

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


class Stages:
    """Reports the demo's stages as they happen; this base class stays silent (benchmarks, tests)."""

    def start(self, name: str, total: int | None = None) -> None:
        """A new stage begins (the previous one is finished); `total` items if countable."""

    def update(self, completed: int) -> None:
        """Items of the current stage done so far (may be called from another thread)."""

    def finish(self) -> None:
        """The last stage is finished."""

    def print(self, message: str) -> None:
        """A line for the user (this base class drops it)."""


class RichStages(Stages):
    """One line per stage with a bar (or spinner) and its elapsed time (rich; thread-safe).
    `print` writes a line above the bars while they run."""

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.bar = Progress(SpinnerColumn(finished_text="[green]✓"), TextColumn("{task.description:<46}"),
                            BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self.task = None
        self.running = False

    def print(self, message: str) -> None:
        self.bar.console.print(message, markup=False, highlight=False, soft_wrap=True)

    def start(self, name: str, total: int | None = None) -> None:
        if not self.running:
            self.bar.start()
            self.running = True
        self._close_task()
        self.task = self.bar.add_task(name, total=total)

    def update(self, completed: int) -> None:
        if self.task is not None:
            self.bar.update(self.task, completed=completed)

    def _close_task(self) -> None:
        if self.task is not None:
            total = self.bar.tasks[self.task].total or 1
            self.bar.update(self.task, total=total, completed=total)
            self.bar.stop_task(self.task)
            self.task = None

    def finish(self) -> None:
        self._close_task()
        if self.running:
            self.bar.stop()
            self.running = False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_config(work: Path, sink: LocalSink, inference: dict | None = None, rules: dict | None = None) -> Config:
    """A loopback node that forwards to the local sink; completion right after the declared size."""
    return config_from_dict({
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": free_port(),
                 "storage_dir": str(work / "node"), "min_free_disk_mb": 1},
        "series": {"quiet_seconds": 2.0, "settle_seconds": 0.2},
        "metrics": {"enabled": False},
        "destinations": [{"name": "demo-sink", "ae_title": sink.ae_title, "host": "127.0.0.1", "port": sink.port}],
        "inference": inference or {},
        "rules": rules or {},
    }, source="<demo>")


@dataclass
class DemoResult:
    """What a run measured; times are wall-clock seconds."""

    model: str
    device: str
    slices: int
    matrix: tuple[int, int]
    job_state: str
    job_error: str | None
    timings: dict[str, float]
    latency: float | None  # last instance received by the node -> last result acknowledged by the sink
    send_seconds: float
    received: list[Path]
    previews: list[Path] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


def run_case(work: Path, processor, case: dict, cfg_inference: dict | None = None, timeout: float = 600.0,
             previews: bool = True, on_processing=None, rules: dict | None = None,
             stages: Stages | None = None) -> DemoResult:
    """Send one phantom case through a fresh node into a local sink and collect the results.

    `processor` is what the node runs in its inference process (a picklable Processor or a
    factory of one, e.g. `dicomnode.engine.Synthesis`)."""
    from dicomnode.node import Node
    from dicomnode.scu import store_files

    stages = stages or Stages()
    n = len(case["mr"])
    for stale in ("node", "sink", "previews"):  # a fresh journal and sink per run
        shutil.rmtree(work / stale, ignore_errors=True)
    sink: LocalSink = LocalSink(work / "sink", on_received=lambda _p: stages.update(len(sink.received))).start()
    cfg = demo_config(work, sink, cfg_inference, rules)
    synthesising = threading.Event()

    def on_slices(done: int, total: int) -> None:  # from the inference process, via the node
        if not synthesising.is_set():
            synthesising.set()
            stages.start("synthesising (Pix2Pix -> cDDPM), per slice", total)
        stages.update(done)

    node = Node(cfg, processor, serve_metrics=False, on_progress=on_slices)
    engine = node.engine
    if engine is None:
        raise ValueError("the demo needs a processor")
    stages.start("starting the inference process (loads the model)")
    t0 = time.time()
    try:
        node.start()
    except BaseException:
        sink.stop()
        raise
    stages.print(f"model {engine.info['name']} on {engine.info['device']} ready in {time.time() - t0:.1f} s")
    try:
        stages.start(f"sending {n} MR slices to the node (C-STORE)", n)
        t0 = time.time()
        report = store_files([Path(p) for p in case["mr"]], "127.0.0.1", cfg.node.port, cfg.node.ae_title,
                             calling_aet="DEMOSCU", on_progress=lambda *_a, c=iter(range(1, n + 1)): stages.update(next(c)))
        send_seconds = time.time() - t0
        if not report.ok:
            raise RuntimeError(f"the node refused {len(report.failed)} file(s): {report.failed[0][1]}")
        failed = lambda: any(j.state in ("failed", "ignored") for j in node.journal.jobs())  # noqa: E731
        if on_processing is not None:
            on_processing(node)
        stages.start("waiting for the series to complete")
        deadline = time.time() + timeout
        sink.wait_for(1, max(0.0, deadline - time.time()), give_up=failed)
        stages.start("receiving the synthetic series (local PACS)", n)
        stages.update(len(sink.received))
        sink.wait_for(n, max(0.0, deadline - time.time()), give_up=failed)
        stages.finish()
        node.wait_idle(timeout=30)
        job = max((j for j in node.journal.jobs() if j.series_uid == case["mr_series_uid"]), key=lambda j: j.id)
        acked = max((t for t, _ in sink.received), default=None)
        latency = acked - job.last_instance_at if acked is not None else None
        received = sorted((p for _, p in sink.received), key=lambda p: int(dcmread(p, stop_before_pixels=True)
                                                                            .InstanceNumber))
        res = DemoResult(engine.info["name"], engine.info["device"], n, (case["rows"], case["cols"]),
                         job.state, job.error or (job.reason if job.state == "ignored" else None), dict(job.timings),
                         latency, send_seconds, received)
    finally:
        stages.finish()
        node.stop()
        sink.stop()
    if previews and received:
        res.previews, res.metrics = _previews_and_metrics(case, received, work / "previews")
    return res


def _previews_and_metrics(case: dict, received: list[Path], out_dir: Path) -> tuple[list[Path], dict]:
    """MR | synthetic | real fusion per slice, and PSNR/SSIM of synthetic vs real (banner rows cut)."""
    from dicomnode.tools.offline import write_previews

    outputs = [dcmread(p) for p in received]
    sources = [dcmread(p) for p in case["mr"]]
    real_by_mr = {ds.SourceImageSequence[0].ReferencedSOPInstanceUID: ds.pixel_array
                  for ds in map(dcmread, case["fusion"])}  # the phantom's fusion names its MR slice first
    real = [real_by_mr[o.SourceImageSequence[0].ReferencedSOPInstanceUID] for o in outputs]
    paths = write_previews(sources, outputs, out_dir, extra=real)
    metrics: dict[str, float] = {}
    try:
        from dicomnode.tools.imagemetrics import psnr, ssim
    except ImportError:
        return paths, metrics
    cut = int(round(BANNER_CROP * outputs[0].Rows))
    fake = np.stack([o.pixel_array[cut:] for o in outputs]).transpose(0, 3, 1, 2)
    true = np.stack([r[cut:] for r in real]).transpose(0, 3, 1, 2)
    metrics["psnr_db"] = float(np.mean(psnr(true, fake)))
    metrics["ssim"] = float(np.mean(ssim(true, fake)))
    return paths, metrics


def run_demo(out: Path, model: str = "default", device: str = "auto", seed: int = 7, rows: int = 320,
             slices: int = 15, echo=print, stages: Stages | None = None) -> DemoResult:
    """The `dicomnode demo` command: load the shipped model, run one phantom case, report."""
    from dicomnode.config import InferenceConfig
    from dicomnode.engine import Synthesis
    from dicomnode.tools.phantom import write_case

    stages = stages or Stages()
    out = Path(out).resolve()
    stages.start(f"making a phantom case ({slices} slices)")
    case = write_case(out / "phantom", seed, rows=rows, slices=slices, lesion=True)
    echo(f"phantom case: {len(case['mr'])} sagittal T2FS slices {case['rows']}x{case['cols']} "
         f"({case['vendor']}, lesion at {case['lesion_level']}) -> {out / 'phantom'}")
    res = run_case(out, Synthesis(InferenceConfig(model=model, device=device)), case,
                   {"model": model, "device": device}, stages=stages)
    if res.job_state not in ("done", "sending") or len(res.received) != res.slices:
        raise RuntimeError(f"the job ended {res.job_state}: {res.job_error or 'not every result arrived'}")
    echo(f"synthetic series: {len(res.received)} Secondary Capture images received by the local PACS "
         f"-> {out / 'sink'}")
    echo(f"previews (MR | synthetic | phantom's real PET/T2FS fusion): {out / 'previews'}")
    echo("stage timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in res.timings.items()))
    if res.latency is not None:
        echo(f"end to end (last instance received -> all results acknowledged): {res.latency:.2f} s")
    if res.metrics:
        echo(f"vs the phantom's real fusion: PSNR {res.metrics['psnr_db']:.2f} dB, SSIM {res.metrics['ssim']:.3f} "
             f"(RGB in [0,1], banner rows excluded)")
    return res
