"""The inference engine contract: what the process stage needs from wherever the model runs.

Two engines implement it: `dicomnode.localengine.InferenceProcess` (one child process on this
machine) and `dicomnode.cluster.RayEngine` (a pool of Ray actors). The process stage
(`dicomnode.process.ProcessStage`) sees only this module: an `InferenceRequest` in (ids and
paths, never pixel data), an `EngineResult` out, and one of the five exceptions below, which
decide what happens to the job. Nothing here imports torch or Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, TypedDict, Union

from pydicom import Dataset

from dicomnode.config import InferenceConfig, SafetyConfig

# InferenceRefused: a processor raises it, so it lives with the Processor contract; it is the fifth exception here.
from dicomnode.records import CompleteSeries, InferenceRefused, Processor, ProcessResult  # noqa: F401


class InferenceFailed(RuntimeError):
    """The processor raised: the series could not be synthesised (the engine is fine). The job fails."""


class InferenceCrashed(RuntimeError):
    """The engine's worker died (signal, abort, out of memory) or could not start. The job is retried
    up to `[inference] crash_retries` times."""


class InferenceTimeout(RuntimeError):
    """The job exceeded the watchdog; the worker was killed and is replaced. The job fails."""


class InferenceUnavailable(RuntimeError):
    """The engine cannot be reached (a Ray cluster): the job waits in the queue, no attempt is counted."""


@dataclass(frozen=True)
class InferenceRequest:
    """One job for an engine: ids and paths only; the outputs go to `out_dir`."""

    job_id: int
    study_uid: str
    series_uid: str
    paths: tuple[str, ...]
    out_dir: str


class EngineResult(TypedDict):
    """What an engine returns for a job whose outputs are written to the request's `out_dir`."""

    outputs: int  # derived instances written
    timings: dict[str, float]  # seconds per step
    metrics: dict[str, float]


# A picklable Processor, or a picklable factory of one (e.g. `Synthesis`), built where the engine runs.
ProcessorSpec = Union[Processor, Callable[[], Processor]]


class Engine(Protocol):
    """Where the model runs. `run` may be called from `capacity` threads at once."""

    capacity: int  # jobs in flight at once
    hold_jobs_while_unready: bool  # True: while not `ready`, jobs stay queued instead of waiting in `run`
    info: dict[str, Any]  # the loaded processor: name, device, ... (empty until ready)

    @property
    def ready(self) -> bool:
        """The model is loaded and a job can start now."""

    def status(self) -> tuple[bool, str]:
        """(ready, one line for /readyz)."""

    def start(self, wait_ready: bool = True) -> None:
        """Start the worker(s); with `wait_ready`, return once the model is loaded (or raise
        InferenceCrashed)."""

    def ensure_started(self) -> None:
        """Called on every tick of the process stage: replace a worker that died while idle, or
        reconnect, in the background."""

    def run(self, request: InferenceRequest, timeout: float) -> EngineResult:
        """Run one job with a watchdog of `timeout` seconds; raise one of the five exceptions."""

    def stop(self) -> None:
        """Stop the worker(s); a job in flight ends with InferenceUnavailable or InferenceCrashed."""


@dataclass(frozen=True)
class Synthesis:
    """The processor `serve` runs: a picklable recipe that loads the model named by [inference]
    where the engine runs (the node's own process never imports torch)."""

    inference: InferenceConfig
    uncertainty: bool = False  # [output] uncertainty
    safety: SafetyConfig = field(default_factory=SafetyConfig)  # [safety]: the input gate and the output check

    def using_model(self, folder: Path | str) -> Synthesis:
        """The same recipe with the model loaded from `folder` (a Ray actor's copy of the model)."""
        return replace(self, inference=self.inference.model_copy(update={"model": str(folder)}))

    def __call__(self) -> Processor:
        from dicomnode.synthesize import load_synthesizer

        synthesizer = load_synthesizer(self.inference, uncertainty=self.uncertainty, safety=self.safety)
        synthesizer.warm_up()  # one-off kernel and allocator set-up happens now, not in the first job
        return synthesizer


def build_processor(spec: ProcessorSpec) -> Processor:
    """The processor itself, or the one its factory builds (in the engine's worker)."""
    return spec if hasattr(spec, "process") else spec()  # type: ignore[return-value]


def run_processor(processor: Processor, req: InferenceRequest, datasets: Sequence[Dataset]) -> ProcessResult:
    """One job through a processor, wherever it runs (the inference process, a Ray actor)."""
    series = CompleteSeries(req.job_id, req.study_uid, req.series_uid, tuple(Path(p) for p in req.paths))
    result = processor.process(series, datasets)
    if not result.datasets:
        raise ValueError("the processor returned no images")
    return result


def output_name(ds: Dataset) -> str:
    """The file name of a derived instance in the job's output folder."""
    from dicomnode.spool import check_uid

    return f"{check_uid(ds.SOPInstanceUID, 'output SOP Instance UID')}.dcm"


def describe_processor(processor: Processor) -> dict[str, Any]:
    """The `info` an engine reports once its processor is built."""
    return {"name": processor.name, "device": str(getattr(processor, "device", "cpu"))}
