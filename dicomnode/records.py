"""Small typed records that cross stage boundaries (the journal holds the state)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

from pydicom import Dataset


@dataclass(frozen=True)
class CompleteSeries:
    """A series that the assembler declared complete: its UIDs and the spooled files."""

    job_id: int
    study_instance_uid: str
    series_instance_uid: str
    paths: tuple[Path, ...]


class InferenceRefused(RuntimeError):
    """The safety gate refused the series ([safety] refuse): its input lies outside the model's
    training data, or the output failed its check. The job ends 'ignored' with the reason."""

    def __init__(self, check: str, reason: str, score: float | None = None):
        super().__init__(check, reason, score)
        self.check, self.reason, self.score = check, reason, score

    def __str__(self) -> str:
        return self.reason


@dataclass
class ProcessResult:
    """What a processing stage returns: derived datasets plus per-stage timings in seconds."""

    datasets: list[Dataset]
    timings: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


class Processor(Protocol):
    """The one synthesiser interface: a complete, selected series in, derived datasets out.

    The daemon, `dicomnode infer` and `dicomnode demo` all go through it. It must not
    touch the network or the journal; it raises on failure (the job records the reason).
    """

    name: str

    def process(self, series: CompleteSeries, datasets: Sequence[Dataset]) -> ProcessResult: ...
