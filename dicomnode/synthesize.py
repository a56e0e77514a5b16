"""The synthesiser: one selected T2FS series in, one derived synthetic PET/T2FS fusion series out.

The daemon, `dicomnode infer` and `dicomnode demo` all run this class. The model is found and
loaded (card and checksums verified) once at start; each series is then prepared, translated in
batches under `torch.inference_mode` (channels-last, bf16 autocast on CUDA), mapped back to the
source grids and encoded. One series at a time (a lock), so the GPU never holds two jobs.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from pydicom import Dataset

from dicomnode.config import DEVICE_RE, InferenceConfig, SafetyAction, SafetyConfig
from dicomnode.encode import encode_series, uncertainty_image
from dicomnode.infer import heap
from dicomnode.infer.gate import Gate, load_gate
from dicomnode.infer.model import FusionModel, ModelError, load_model
from dicomnode.infer.preprocess import outputs_to_rgb, prepare_series
from dicomnode.modelpath import DEFAULT_MODEL, model_search_path, resolve_model  # noqa: F401 (re-exported)
from dicomnode.records import CompleteSeries, InferenceRefused, ProcessResult

log = logging.getLogger("dicomnode.infer")

FAST_SAMPLERS = ("ddim", "dpmpp2m")
WARNINGS = {"input": "INPUT OUTSIDE TRAINING DATA", "output": "OUTPUT CHECK FAILED"}


class DeviceError(ValueError):
    """The requested compute device is not valid or not present on this machine."""


def pick_device(device: str = "auto") -> torch.device:
    """auto = CUDA when available, else CPU; an explicit CUDA device must exist."""
    if not DEVICE_RE.fullmatch(device or ""):
        raise DeviceError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} requested but this machine has no usable CUDA GPU "
                              f"(PyTorch {torch.__version__}); use --device cpu or auto")
        if (dev.index or 0) >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA GPU(s) exist")
    return dev


@dataclass(frozen=True)
class Settings:
    """What besides the model decides the pixels (hashed into the output UIDs)."""

    sampler: str
    steps: int
    strength: float
    seed: int
    batch_size: int
    samples: int = 1
    refine: bool = True

    def digest(self) -> str:
        text = (f"{self.sampler}|{self.steps}|{self.strength:.4f}|{self.seed}|{self.batch_size}|{int(self.refine)}"
                f"|{self.samples}")
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class Synthesizer:
    """The Processor of the node: prepare -> translate -> back to the source grid -> encode."""

    def __init__(self, model: FusionModel, settings: Settings, *, model_name: str, banner: bool = True,
                 encode_options: dict | None = None, uncertainty: bool = False, gate: Gate | None = None,
                 safety: SafetyConfig | None = None):
        self.model, self.settings, self.banner = model, settings, banner
        self.gate, self.safety = gate, safety or SafetyConfig(input=SafetyAction.OFF, output=SafetyAction.OFF)
        self.uncertainty = uncertainty  # also encode the K-sample SD as a series of its own
        self.model_name, self.name = model_name, f"{model_name} {model.version}"
        self.encode_options = encode_options or {}
        self.device = model.device
        self._lock = threading.Lock()
        # Interactive commands (demo, infer) set this to follow a series slice by slice:
        # called as progress(slices_done, slices_total) from the processing thread.
        self.progress: Callable[[int, int], None] | None = None

    @property
    def version(self) -> str:
        return self.model.version

    def translate(self, batch: np.ndarray) -> np.ndarray:
        """(S, 1, G, G) model-grid MR -> (S, 3, G, G) fusion in [-1, 1], in chunks of batch_size.

        Chunk i uses seed + i * batch_size, so chunks get different noise and the result depends
        only on the settings (batch size included), never on timing or device load.
        """
        return self.translate_with_sd(batch)[0]

    def translate_with_sd(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """As `translate`, plus the per-pixel SD over the K samples, (S, G, G) averaged over the
        colour channels in [-1, 1] units (None when K = 1)."""
        s, out, sds = self.settings, [], []
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext())
        with torch.inference_mode(), autocast:
            for start in range(0, len(batch), s.batch_size):
                mr = torch.from_numpy(batch[start:start + s.batch_size]).contiguous(memory_format=torch.channels_last)
                res = self.model.translate(mr, refine=s.refine, sampler=s.sampler, steps=s.steps,
                                           strength=s.strength, seed=s.seed + start, samples=s.samples)
                out.append(res.rgb.float().cpu().numpy())
                if res.sd is not None:
                    sds.append(res.sd.float().mean(1).cpu().numpy())
                if self.progress is not None:
                    self.progress(min(start + s.batch_size, len(batch)), len(batch))
        return np.concatenate(out), (np.concatenate(sds) if sds else None)

    def warm_up(self) -> None:
        """Translate one blank slice, so the first real series does not pay for lazy initialisation."""
        from dicomnode.infer.grid import MODEL_GRID

        with self._lock:
            self.translate(np.zeros((1, 1, MODEL_GRID, MODEL_GRID), dtype=np.float32))
            heap.trim()

    def process(self, series: CompleteSeries | None, datasets: Sequence[Dataset | str | os.PathLike]) -> ProcessResult:
        """Synthesise one series; raise with a reason (the Worker marks the job failed)."""
        with self._lock:
            try:
                return self._process(datasets)
            except BaseException:
                release_memory(self.device)
                raise
            finally:
                heap.trim()  # the freed activations were kept for reuse during the job

    def _process(self, datasets) -> ProcessResult:
        t, m = {}, {}
        t0 = time.perf_counter()
        prepared = prepare_series(datasets)
        t["preprocess"] = time.perf_counter() - t0
        flags = []
        if self.gate is not None and self.safety.input != SafetyAction.OFF:
            t0 = time.perf_counter()
            score = self.gate.score(self.model.generator, prepared.batch)
            t["input_gate"] = time.perf_counter() - t0
            m["input_score"] = score.score
            if not score.passed:
                flags.append(self._judge("input", score.reason(), self.safety.input, m, score.score))
        t0 = time.perf_counter()
        outputs, sd = self.translate_with_sd(prepared.batch)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t["infer"] = time.perf_counter() - t0
        if not np.isfinite(outputs).all():
            raise FloatingPointError("the model produced non-finite values")
        if self.gate is not None and self.safety.output != SafetyAction.OFF:
            t0 = time.perf_counter()
            check = self.gate.check_output(outputs, prepared.batch)
            t["output_check"] = time.perf_counter() - t0
            if not check.passed:
                flags.append(self._judge("output", check.reason(), self.safety.output, m, m.get("input_score")))
        t0 = time.perf_counter()
        rgb = outputs_to_rgb(prepared, outputs)
        t["postprocess"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        variant = output_variant(self.settings, prepared.datasets)
        warning = " / ".join(WARNINGS[f] for f in flags) or None
        out = encode_series(prepared.datasets, rgb, model_name=self.model_name, model_version=self.model.version,
                            banner=self.banner, uid_variant=variant, warning=warning, **self.encode_options)
        if self.uncertainty and sd is not None:
            # SD in [-1, 1] units -> display levels of the 8-bit fusion, on each slice's own grid
            maps = [uncertainty_image(placement.from_grid(grid) * 127.5)
                    for placement, grid in zip(prepared.placements, sd)]
            out += encode_series(prepared.datasets, maps, model_name=self.model_name,
                                 model_version=self.model.version, banner=self.banner, uid_variant=variant,
                                 kind="uncertainty", warning=warning, **self.encode_options)
        t["encode"] = time.perf_counter() - t0
        n = len(prepared)
        return ProcessResult(out, t, {"slices": float(n), "infer_seconds_per_slice": t["infer"] / n, **m})

    @staticmethod
    def _judge(check: str, reason: str, action: SafetyAction, metrics: dict, score: float | None = None) -> str:
        """Refuse (raise) or flag (log, count, return the check's name) a series that failed a check."""
        if action == SafetyAction.REFUSE:
            raise InferenceRefused(check, reason, score)
        log.warning("flagged: %s", reason)
        metrics[f"{check}_flagged"] = 1.0
        return check


def output_variant(settings: Settings, sources: Sequence[Dataset]) -> str:
    """What goes into the output UIDs besides the model: the sampler settings and the exact set of
    source instances. The same series processed again gives the same UIDs (a re-send replaces);
    a series whose set of instances changed (a late or missing slice) gives a new series, never
    the same UIDs with different pixels."""
    members = hashlib.sha256("\\".join(sorted(str(ds.SOPInstanceUID) for ds in sources)).encode()).hexdigest()
    return f"{settings.digest()}/{members[:16]}"


def release_memory(device: torch.device) -> None:
    """After a failed job: drop garbage and return cached GPU blocks so the next job starts clean."""
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def settings_from(cfg: InferenceConfig, model: FusionModel) -> Settings:
    """[inference] -> sampler settings: 'fast' is the card's fast sampler (DDIM unless it names
    DPM-Solver++), 'ddpm' the ancestral sampler over the schedule."""
    card = model.defaults
    card_sampler = card.get("sampler", "ddim")
    sampler = "ddpm" if cfg.sampler == "ddpm" else (card_sampler if card_sampler in FAST_SAMPLERS else "ddim")

    def pick(value, key):  # the config overrides the card's validated value only when set
        return card[key] if value is None else value

    return Settings(sampler=sampler, steps=int(pick(cfg.steps, "steps")), strength=float(pick(cfg.warm_start, "strength")),
                    seed=int(cfg.seed), batch_size=int(cfg.batch_size), samples=int(pick(cfg.samples, "samples")))


def load_synthesizer(cfg: InferenceConfig, uncertainty: bool = False, safety: SafetyConfig | None = None,
                     **encode_options) -> Synthesizer:
    """Resolve, verify and load the model once (warm), on the configured device."""
    path = resolve_model(cfg.model)
    device = pick_device(cfg.device)
    if device.type == "cpu":
        heap.keep_freed_memory()
    t0 = time.perf_counter()
    model = load_model(path, device)
    name = model.card.get("name") or path.name
    if not name.isascii():
        raise ModelError(f"{path / 'model.json'}: model name must be ASCII")
    settings = settings_from(cfg, model)
    if uncertainty and settings.samples < 2:
        raise ModelError(f"[output] uncertainty needs at least 2 samples per slice; the model card and [inference] "
                         f"give {settings.samples} (set [inference] samples = 4)")
    gate = load_gate(path, model.card)
    if gate is None and safety is not None and (safety.input, safety.output) != (SafetyAction.OFF,) * 2:
        log.warning("model %s has no calibrated safety gate: [safety] checks nothing until it is calibrated "
                    "(python -m training calibrate-gate)", name)
    synth = Synthesizer(model, settings, model_name=name, banner=cfg.banner, encode_options=encode_options,
                        uncertainty=uncertainty, gate=gate, safety=safety)
    log.info("model %s %s loaded from %s on %s in %.1f s (%s, %d steps, strength %.2f)", name, model.version, path,
             device, time.perf_counter() - t0, synth.settings.sampler, synth.settings.steps, synth.settings.strength)
    return synth


def gate_dry_run(cfg: InferenceConfig, safety: SafetyConfig, series: dict[str, list]) -> dict[str, dict]:
    """`rules test`: the input gate on each series (uid -> its files) without synthesising: per series
    {"input_score", "decision", "reason"}; decision is pass, refuse, flag, off or not calibrated."""
    path = resolve_model(cfg.model)
    model = load_model(path, "cpu")
    gate = load_gate(path, model.card)
    out: dict[str, dict] = {}
    for uid, files in series.items():
        if gate is None or safety.input == SafetyAction.OFF:
            out[uid] = {"input_score": None, "decision": "not calibrated" if gate is None else "off", "reason": ""}
            continue
        try:
            score = gate.score(model.generator, prepare_series(files).batch)
        except ValueError as exc:  # a series the node could not prepare either
            out[uid] = {"input_score": None, "decision": "unreadable", "reason": str(exc)}
            continue
        out[uid] = {"input_score": score.score, "decision": "pass" if score.passed else str(safety.input),
                    "reason": "" if score.passed else score.reason()}
    return out
