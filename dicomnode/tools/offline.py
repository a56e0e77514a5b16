"""`dicomnode infer`: the node's select -> synthesise -> encode pipeline on files, without a network.

Files are grouped by series, the selection rules decide (unless `select_all`), the same
Synthesizer the daemon uses produces the derived series, and the outputs are written as
OUT_DIR/<output series UID>/<SOP Instance UID>.dcm, with optional PNG previews. A summary of
every series (decision, outputs, timings, failure reason) goes to OUT_DIR/infer.json.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from pydicom import Dataset, dcmread

from dicomnode.config import RulesConfig
from dicomnode.engine import InferenceRefused
from dicomnode.records import CompleteSeries
from dicomnode.rules import evaluate, read_headers
from dicomnode.scu import collect_files
from dicomnode.spool import check_uid, write_dataset

log = logging.getLogger("dicomnode.infer")


@dataclass
class SeriesOutcome:
    """One input series: what the rules said and what came out (no patient data)."""

    series_uid: str
    slices: int
    selected: bool
    reason: str
    output_dir: str | None = None
    outputs: int = 0
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    previews: list[str] = field(default_factory=list)
    input_score: float | None = None  # the safety gate's score (None: not checked)
    safety: str = "not checked"  # passed | flagged: ... | refused: ... | not checked

    def record_safety(self, metrics: dict) -> None:
        self.input_score = metrics.get("input_score")
        flagged = [c for c in ("input", "output") if metrics.get(f"{c}_flagged")]
        self.safety = (f"flagged ({', '.join(flagged)})" if flagged else
                       "passed" if "input_score" in metrics else "not checked")

    def refused(self, exc) -> None:
        self.input_score, self.safety = exc.score, f"refused: {exc.reason}"


def mr_to_uint8(volume: np.ndarray) -> np.ndarray:
    """Display window for a whole series: 0.5-99.5 percentile -> 0-255 (as the phantom's windows)."""
    lo, hi = np.percentile(volume, [0.5, 99.5])
    return (np.clip((volume - lo) / max(hi - lo, 1e-6), 0, 1) * 255).round().astype(np.uint8)


def side_by_side(*images: np.ndarray, gap: int = 4) -> np.ndarray:
    """Greyscale or RGB uint8 panels of any sizes next to each other on black, as one RGB image."""
    rgb = [np.repeat(i[..., None], 3, 2) if i.ndim == 2 else i for i in images]
    h = max(i.shape[0] for i in rgb)
    w = sum(i.shape[1] for i in rgb) + gap * (len(rgb) - 1)
    sheet = np.zeros((h, w, 3), np.uint8)
    x = 0
    for i in rgb:
        sheet[:i.shape[0], x:x + i.shape[1]] = i
        x += i.shape[1] + gap
    return sheet


def write_previews(sources: Sequence[Dataset], outputs: Sequence[Dataset], out_dir: Path,
                   extra: Sequence[np.ndarray] | None = None) -> list[Path]:
    """One PNG per slice: MR | synthetic (| `extra`, e.g. the real fusion), in output order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    by_uid = {ds.SOPInstanceUID: ds for ds in sources}
    src = [by_uid[o.SourceImageSequence[0].ReferencedSOPInstanceUID] for o in outputs]
    mr = mr_to_uint8(np.stack([s.pixel_array.astype(np.float32) for s in src]))
    paths = []
    for k, (m, o) in enumerate(zip(mr, outputs)):
        panels = [m, o.pixel_array] + ([extra[k]] if extra is not None else [])
        path = out_dir / f"{int(o.InstanceNumber):03d}.png"
        Image.fromarray(side_by_side(*panels)).save(path)
        paths.append(path)
    return paths


def group_series(in_paths: Sequence[Path]) -> tuple[dict[str, list[Dataset]], list[tuple[Path, str]]]:
    """Headers (with .filename) grouped by Series Instance UID, plus the unreadable files."""
    return read_headers(collect_files(in_paths))


def decide(in_dir: Path, rules: RulesConfig | None, select_all: bool) -> tuple[list[SeriesOutcome], dict]:
    """Every series under `in_dir` with the rules' decision (or "--all"), and the headers by series."""
    groups, bad = group_series([in_dir])
    for path, why in bad:
        log.warning("skipping unreadable file %s: %s", path, why)
    outcomes = []
    for uid, headers in groups.items():
        if select_all:
            selected, reason = True, "--all"
        else:
            decision = evaluate(rules or RulesConfig(), uid, headers)
            selected, reason = decision.matched, decision.reason
        outcomes.append(SeriesOutcome(uid, len(headers), selected, reason))
    return outcomes, groups


def run_infer(in_dir: Path, out_dir: Path, synthesizer, *, rules: RulesConfig | None = None,
              select_all: bool = False, png: bool = False, progress=None) -> list[SeriesOutcome]:
    """Run the pipeline on every series under `in_dir`; failures are recorded, never raised."""
    outcomes, groups = decide(in_dir, rules, select_all)
    out_dir.mkdir(parents=True, exist_ok=True)
    total = sum(o.slices for o in outcomes if o.selected)
    task = progress.add_task("slices", total=total) if progress is not None else None
    done = 0
    for outcome in outcomes:
        if not outcome.selected:
            continue
        if progress is not None:  # the bar follows the model slice by slice
            synthesizer.progress = lambda n, _total, base=done: progress.update(task, completed=base + n)
        try:
            _one_series(outcome, [Path(h.filename) for h in groups[outcome.series_uid]], out_dir, synthesizer, png)
        finally:
            synthesizer.progress = None
        done += outcome.slices
        if progress is not None:
            progress.update(task, completed=done)
    (out_dir / "infer.json").write_text(json.dumps([o.__dict__ for o in outcomes], indent=2) + "\n")
    return outcomes


def _one_series(outcome: SeriesOutcome, paths: list[Path], out_dir: Path, synthesizer, png: bool) -> None:
    try:
        sources = [dcmread(p) for p in paths]
        result = synthesizer.process(CompleteSeries(0, str(sources[0].StudyInstanceUID), outcome.series_uid,
                                                    tuple(paths)), sources)
        target = out_dir / check_uid(result.datasets[0].SeriesInstanceUID, "output Series Instance UID")
        target.mkdir(parents=True, exist_ok=True)
        for ds in result.datasets:
            write_dataset(target / f"{check_uid(ds.SOPInstanceUID, 'output SOP Instance UID')}.dcm", ds)
        outcome.output_dir, outcome.outputs = str(target), len(result.datasets)
        outcome.timings = {k: round(v, 4) for k, v in result.timings.items()}
        outcome.record_safety(result.metrics)
        if png:
            outcome.previews = [str(p) for p in write_previews(sources, result.datasets, target / "preview")]
    except InferenceRefused as exc:
        outcome.refused(exc)
    except Exception as exc:  # one bad series must not stop the others
        outcome.error = f"{type(exc).__name__}: {exc}"
        log.error("series %s failed: %s", outcome.series_uid, outcome.error)


def _load_outcomes(summary: Path) -> dict[str, dict]:
    try:
        return {o["series_uid"]: o for o in json.loads(summary.read_text())}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _finished(previous: dict | None) -> bool:
    """A series a previous run wrote completely (its folder holds every output it reported)."""
    if not previous or previous.get("error") or not previous.get("outputs") or not previous.get("output_dir"):
        return False
    folder = Path(previous["output_dir"])
    return folder.is_dir() and sum(1 for p in folder.glob("*.dcm")) == previous["outputs"]


def run_infer_cluster(in_dir: Path, out_dir: Path, engine, *, rules: RulesConfig | None = None,
                      select_all: bool = False, timeout: float = 3600.0, progress=None) -> list[SeriesOutcome]:
    """Archive mode: every selected series under `in_dir` through `engine` (a started
    `dicomnode.cluster.RayEngine`), `engine.capacity` series at a time.

    Restartable: infer.json is rewritten after every series, and a series that a previous run
    finished (its folder has every output it reported) is skipped. A series is written to
    OUT_DIR/.partial/ and moved into place only when complete, so an interrupted run leaves no
    half series where a finished one would be."""
    import shutil
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from dicomnode.engine import InferenceRequest

    outcomes, groups = decide(in_dir, rules, select_all)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = out_dir / "infer.json"
    previous = _load_outcomes(summary)
    partial = out_dir / ".partial"
    shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted run: never acknowledged as done
    todo: list[tuple[SeriesOutcome, list[Dataset]]] = []
    for outcome in outcomes:
        old = previous.get(outcome.series_uid)
        if outcome.selected and old is not None and _finished(old):
            outcome.output_dir, outcome.outputs, outcome.timings = old["output_dir"], old["outputs"], old["timings"]
            outcome.reason = f"{outcome.reason}; done by an earlier run"
        elif outcome.selected:
            todo.append((outcome, groups[outcome.series_uid]))
    lock = threading.Lock()
    task = progress.add_task("series", total=len(todo)) if progress is not None else None

    def save() -> None:
        tmp = summary.with_name(".infer.json.tmp")
        tmp.write_text(json.dumps([o.__dict__ for o in outcomes], indent=2) + "\n")
        tmp.replace(summary)

    def one(k: int, outcome: SeriesOutcome, headers: list[Dataset]) -> None:
        staging = partial / f"{k:06d}"
        try:
            staging.mkdir(parents=True)
            paths = tuple(str(h.filename) for h in headers)
            result = engine.run(InferenceRequest(k, str(headers[0].StudyInstanceUID), outcome.series_uid, paths,
                                               str(staging)), timeout=timeout)
            first = dcmread(next(staging.glob("*.dcm")), stop_before_pixels=True)
            target = out_dir / check_uid(first.SeriesInstanceUID, "output Series Instance UID")
            shutil.rmtree(target, ignore_errors=True)  # a stale copy (never reported done) is replaced whole
            staging.replace(target)
            outcome.output_dir, outcome.outputs = str(target), result["outputs"]
            outcome.timings = {k: round(v, 4) for k, v in result["timings"].items()}
            outcome.record_safety(result["metrics"])
        except InferenceRefused as exc:
            outcome.refused(exc)
        except Exception as exc:  # one bad series must not stop the others
            outcome.error = f"{type(exc).__name__}: {exc}"
            log.error("series %s failed: %s", outcome.series_uid, outcome.error)
        with lock:
            save()
            if progress is not None:
                progress.advance(task)

    save()
    with ThreadPoolExecutor(max(1, engine.capacity)) as pool:
        list(pool.map(lambda a: one(*a), [(k, o, h) for k, (o, h) in enumerate(todo)]))
    shutil.rmtree(partial, ignore_errors=True)
    save()
    return outcomes
