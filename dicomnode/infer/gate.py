"""The safety gate: is this series like the model's training data, and is what it made like a fusion?

Input score (before synthesis), from three measurements against the training split, each
divided by its threshold so that 1.0 is the line:

- **features**: the generator's own encoder activations (per-channel mean and SD of its first
  five levels, `UnetGenerator.encoder_features`), a Mahalanobis distance per slice to the
  training slices (covariance shrunk towards its diagonal), the series' median;
- **image statistics**: seven numbers per slice on the normalised model input (body share of the
  field of view, mean and bright share of the body, noise, signal falling across the body in two
  directions, elongation of the body), the series' median of each, a Mahalanobis distance to the
  training series;
- **ghosting**: the series' median height of the sharpest echo of a slice's fine structure in
  itself (motion ghosts), on its own.

score = the largest of the three ratios. A series passes at score <= 1.

Output check (after synthesis, before encoding), on the PET part of the fusion (the fusion minus
its known grey, `dicomnode.infer.presentation`): PET colour in the air around the body, the body's
mean uptake, its saturated (white) share and the spread of its uptake (0 when the output
collapsed) must lie inside the range the training split's real fusions span, widened by a margin.

Both are computed by `python -m training calibrate-gate` and stored in the model folder
(`gate.safetensors`, sha256 in the card's `gate` block, with the thresholds and how they were
chosen). The score says how unlike the training data a series is; it does not say the output is
right when it passes.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dicomnode.modelpath import ModelError

GATE_FILE = "gate.safetensors"
FORMAT = "dicomnode-gate/1"
LEVELS = 5
SHRINK = 0.1  # covariance shrinkage towards its diagonal (5,000 slices, ~700 features)
IMAGE_STATS = ("body", "mean", "bright", "noise", "falloff_rows", "falloff_cols", "elongation", "ghosting")
GENERAL = len(IMAGE_STATS) - 1  # the first seven go into one distance; motion ghosts are scored on their own
OUTPUT_STATS = ("outside", "uptake", "saturated", "spread")
BATCH = 32


# -- measurements ----------------------------------------------------------------------------

def _box(x: torch.Tensor, k: int) -> torch.Tensor:
    """Mean over a k x k window (separable), replicating the border."""
    x = F.avg_pool2d(F.pad(x, (0, 0, k // 2, k // 2), mode="replicate"), (k, 1), 1)
    return F.avg_pool2d(F.pad(x, (k // 2, k // 2, 0, 0), mode="replicate"), (1, k), 1)


def ghosting(u: torch.Tensor) -> torch.Tensor:
    """(S, 1, G, G) in [0, 1] -> (S,): the strongest echo of each slice's edges in itself along
    either image axis. Motion ghosts are copies of the body shifted along the phase-encoding
    direction: the autocorrelation of the image's fine structure (the image minus its 7 x 7 mean),
    normalised to 1 at lag 0, gets a sharp peak at the shift; anatomy repeats its edges only
    faintly. The peak's height above the mean of the values G/64 lags either side, the highest
    for lags between G/8 and G/2."""
    x = (u - _box(u, 7))[:, 0]
    size = x.shape[-1]
    step, lags = max(1, size // 64), torch.arange(size)
    window = (lags >= size // 8) & (lags <= size // 2)
    peaks = []
    for dim in (1, 2):
        f = torch.fft.rfft(x, dim=dim)
        r = torch.fft.irfft(f * f.conj(), n=size, dim=dim).sum(3 - dim)
        r = r / r[:, :1].clamp_min(1e-12)
        peaks.append((r - 0.5 * (r.roll(step, 1) + r.roll(-step, 1)))[:, window].amax(1))
    return torch.stack(peaks, 1).amax(1)


def image_stats(batch: torch.Tensor) -> torch.Tensor:
    """(S, 1, G, G) model input in [-1, 1] -> (S, 8) statistics, named by IMAGE_STATS."""
    u = (batch.float() + 1) / 2
    body = (_box(u, 9) > 0.05).float()
    n = body.sum((1, 2, 3)).clamp_min(1.0)

    def in_body(x):
        return (x * body).sum((1, 2, 3)) / n

    mean = in_body(u)
    bright = in_body((u > 0.6).float())
    noise = in_body((u - _box(u, 3)).abs()) / mean.clamp_min(1e-3)
    smooth = _box(u, 31) * body
    half = u.shape[-1] // 2
    top, bottom = (..., slice(None, half), slice(None)), (..., slice(half, None), slice(None))
    left, right = (..., slice(None, half)), (..., slice(half, None))

    def region(sl):  # the body's mean smoothed signal in one half of the field of view
        return (smooth[sl].sum((1, 2, 3)) / body[sl].sum((1, 2, 3)).clamp_min(1)).clamp_min(1e-3)

    rows = (region(top) / region(bottom)).log().abs()
    cols = (region(left) / region(right)).log().abs()
    extent_r = (body.amax(3) > 0).float().sum((1, 2))
    extent_c = (body.amax(2) > 0).float().sum((1, 2))
    elongation = (extent_r.clamp_min(1) / extent_c.clamp_min(1)).log()
    return torch.stack([n / u.shape[-1] ** 2, mean, bright, noise, rows, cols, elongation, ghosting(u)], 1)


def pet_part(rgb: torch.Tensor, mr: torch.Tensor, opacity: float) -> torch.Tensor:
    """The PET colour of fusions (S, 3, G, G) in [-1, 1] of the MR (S, 1, G, G): (S, G, G) in [0, 1]."""
    grey = (mr.float() + 1) / 2
    h = (((rgb.float() + 1) / 2 - (1 - opacity) * grey) / opacity).clamp(0, 1)
    return h.mean(1)


def output_stats(rgb: torch.Tensor, mr: torch.Tensor, opacity: float) -> torch.Tensor:
    """Per series (4,), named by OUTPUT_STATS: mean PET colour in the air, mean uptake in the body,
    the body's saturated share, and the SD of the body's uptake."""
    pet = pet_part(rgb, mr, opacity)
    u = (mr.float() + 1) / 2
    near = _box(u, 15)[:, 0]
    air, body = near < 0.01, _box(u, 9)[:, 0] > 0.05
    if not body.any():
        return torch.tensor([float(pet.mean()), 0.0, 0.0, 0.0])
    inside = pet[body]
    white = ((rgb.float() + 1) / 2 > 0.98).all(1)[body].float().mean()
    outside = pet[air].mean() if air.any() else torch.tensor(0.0)
    return torch.stack([outside, inside.mean(), white, inside.std() if inside.numel() > 1 else inside.sum() * 0])


def _features(generator, batch: torch.Tensor) -> torch.Tensor:
    device = next(generator.parameters()).device
    out = []
    with torch.inference_mode():
        for start in range(0, len(batch), BATCH):
            x = batch[start:start + BATCH].to(device, torch.float32).contiguous(memory_format=torch.channels_last)
            out.append(generator.encoder_features(x, LEVELS).float().cpu())
    return torch.cat(out)


def _mahalanobis(x: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    d = (x.double() - mean.double())
    return torch.einsum("ni,ij,nj->n", d, precision.double(), d).clamp_min(0).sqrt().float()


def fit_gaussian(x: torch.Tensor, shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and precision of rows of x, the covariance shrunk towards its diagonal."""
    x = x.double()
    mean = x.mean(0)
    cov = torch.cov(x.T).reshape(x.shape[1], x.shape[1])
    diag = torch.diag(torch.diag(cov)).clamp_min(0)
    cov = (1 - shrink) * cov + shrink * diag + 1e-9 * torch.eye(len(mean), dtype=cov.dtype) * diag.trace().clamp_min(1e-12)
    return mean.float(), torch.linalg.pinv(cov, hermitian=True).float()


# -- the calibrated gate ---------------------------------------------------------------------

@dataclass(frozen=True)
class InputScore:
    """One series' distances and decision (score = the larger ratio to its threshold)."""

    features: float  # median Mahalanobis distance of the slices' generator features
    statistics: float  # Mahalanobis distance of the series' general image statistics
    ghosting: float  # the series' median motion-ghost echo (`ghosting`)
    score: float  # the largest of the three over its threshold; > 1: outside the training data
    worst: str  # the image statistic furthest from training (in training SDs), for the reason
    worst_z: float

    @property
    def passed(self) -> bool:
        return self.score <= 1.0

    def reason(self) -> str:
        return (f"input outside the model's training data: score {self.score:.2f} (1.00 is the limit; generator "
                f"features {self.features:.1f}, image statistics {self.statistics:.1f}, ghosting {self.ghosting:.3f}; "
                f"furthest: {self.worst} {self.worst_z:+.1f} SD)")


@dataclass(frozen=True)
class OutputCheck:
    values: dict[str, float]
    failures: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return not self.failures

    def reason(self) -> str:
        return "output unlike any training fusion: " + "; ".join(self.failures)


@dataclass
class Gate:
    """The calibration stored with a model (`gate.safetensors` plus the card's `gate` block)."""

    feature_mean: torch.Tensor
    feature_precision: torch.Tensor
    stats_mean: torch.Tensor
    stats_precision: torch.Tensor
    stats_sd: torch.Tensor
    feature_threshold: float
    stats_threshold: float
    ghost_threshold: float
    output_low: torch.Tensor  # per OUTPUT_STATS; -inf / inf where unbounded
    output_high: torch.Tensor
    opacity: float = 0.5

    def score(self, generator, batch: np.ndarray | torch.Tensor) -> InputScore:
        x = torch.as_tensor(batch)
        feats = _mahalanobis(_features(generator, x), self.feature_mean, self.feature_precision)
        stats = image_stats(x).median(0).values
        dist = float(_mahalanobis(stats[None, :GENERAL], self.stats_mean[:GENERAL], self.stats_precision)[0])
        z = (stats - self.stats_mean) / self.stats_sd.clamp_min(1e-6)
        k = int(z.abs().argmax())
        f, ghost = float(feats.median()), float(stats[GENERAL])
        score = max(f / self.feature_threshold, dist / self.stats_threshold, ghost / self.ghost_threshold)
        return InputScore(round(f, 3), round(dist, 3), round(ghost, 4), round(score, 4), IMAGE_STATS[k],
                          round(float(z[k]), 2))

    def check_output(self, rgb: np.ndarray | torch.Tensor, mr: np.ndarray | torch.Tensor) -> OutputCheck:
        values = output_stats(torch.as_tensor(rgb), torch.as_tensor(mr), self.opacity)
        fails = []
        for name, v, lo, hi in zip(OUTPUT_STATS, values.tolist(), self.output_low.tolist(), self.output_high.tolist()):
            if not math.isfinite(v) or v < lo or v > hi:
                fails.append(f"{name} {v:.3f} outside {lo:.3f}..{hi:.3f}")
        return OutputCheck({k: round(v, 4) for k, v in zip(OUTPUT_STATS, values.tolist())}, tuple(fails))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"feature_mean": self.feature_mean, "feature_precision": self.feature_precision,
                "stats_mean": self.stats_mean, "stats_precision": self.stats_precision, "stats_sd": self.stats_sd,
                "output_low": self.output_low, "output_high": self.output_high}


def save_gate(model_dir: str | Path, gate: Gate, info: dict) -> dict:
    """Write gate.safetensors and return the card's `gate` block (thresholds, checksum, `info`)."""
    path = Path(model_dir) / GATE_FILE
    save_file({k: v.contiguous().float() for k, v in gate.tensors().items()}, str(path))
    card = Path(model_dir) / "model.json"
    if card.exists():  # safetensors writes 0600; whoever can read the card (the node's user) must read this too
        path.chmod(card.stat().st_mode & 0o777)
    return {"format": FORMAT, "file": GATE_FILE, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "levels": LEVELS, "image_stats": list(IMAGE_STATS), "output_stats": list(OUTPUT_STATS),
            "feature_threshold": gate.feature_threshold, "stats_threshold": gate.stats_threshold,
            "ghost_threshold": gate.ghost_threshold,
            "output_low": [_num(v) for v in gate.output_low.tolist()],
            "output_high": [_num(v) for v in gate.output_high.tolist()], "opacity": gate.opacity, **info}


def _num(v: float) -> float | None:
    return None if not math.isfinite(v) else round(v, 6)


def load_gate(model_dir: str | Path, card: dict) -> Gate | None:
    """The model's gate, None when its card has no `gate` block (an uncalibrated model)."""
    block = card.get("gate")
    if not block:
        return None
    path = Path(model_dir) / GATE_FILE
    where = Path(model_dir) / "model.json"
    if block.get("format") != FORMAT:
        raise ModelError(f"{where}: gate format {block.get('format')!r} is not {FORMAT!r}")
    if not path.is_file():
        raise ModelError(f"gate file missing: {path} (the card's gate block names it)")
    if hashlib.sha256(path.read_bytes()).hexdigest() != block.get("sha256"):
        raise ModelError(f"checksum mismatch for {path}: recalibrate with `python -m training calibrate-gate`")
    try:
        t = load_file(str(path))
        low = torch.tensor([-math.inf if v is None else v for v in block["output_low"]])
        high = torch.tensor([math.inf if v is None else v for v in block["output_high"]])
        gate = Gate(t["feature_mean"], t["feature_precision"], t["stats_mean"], t["stats_precision"], t["stats_sd"],
                    float(block["feature_threshold"]), float(block["stats_threshold"]),
                    float(block["ghost_threshold"]), low, high,
                    float(block.get("opacity", 0.5)))
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as e:
        raise ModelError(f"{where}: gate unreadable: {e}") from e
    if list(block.get("image_stats", [])) != list(IMAGE_STATS) or int(block.get("levels", -1)) != LEVELS:
        raise ModelError(f"{where}: the gate was calibrated with other statistics; recalibrate it")
    return gate


# -- calibration -----------------------------------------------------------------------------

def series_features(generator, series: Iterable[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per series: the slices' feature rows, and the (N, 8) series statistics (medians)."""
    feats, stats = [], []
    for batch in series:
        feats.append(_features(generator, batch))
        stats.append(image_stats(batch).median(0).values)
    return feats, torch.stack(stats)


def fit(generator, train: list[torch.Tensor], val: list[torch.Tensor],
        margins: tuple[float, float, float]) -> tuple[Gate, dict]:
    """Fit on the training series' slices; the thresholds of the features, the statistics and the
    ghosting = their margins x the largest validation series' value."""
    feats, stats = series_features(generator, train)
    fm, fp = fit_gaussian(torch.cat(feats), SHRINK)
    _, sp = fit_gaussian(stats[:, :GENERAL], SHRINK)
    sm, sd = stats.double().mean(0).float(), stats.double().std(0).float()
    vfeats, vstats = series_features(generator, val)

    def distances(f: list[torch.Tensor], s: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"features": torch.stack([_mahalanobis(x, fm, fp).median() for x in f]),
                "statistics": _mahalanobis(s[:, :GENERAL], sm[:GENERAL], sp), "ghosting": s[:, GENERAL]}

    t, v = distances(feats, stats), distances(vfeats, vstats)
    tf, ts, tg = (round(float(v[k].max()) * m, 4) for k, m in zip(("features", "statistics", "ghosting"), margins))
    gate = Gate(fm, fp, sm, sp, sd, tf, ts, tg, torch.full((len(OUTPUT_STATS),), -math.inf),
                torch.full((len(OUTPUT_STATS),), math.inf))
    spread = {f"{split}_{k}_p50_max": [round(float(d[k].median()), 4), round(float(d[k].max()), 4)]
              for split, d in (("train", t), ("val", v)) for k in d}
    return gate, spread


def output_bounds(values: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 4) output statistics of real fusions -> bounds: air and saturation only from above, uptake
    both ways, spread only from below; `margin` widens each (x margin up, / margin down)."""
    lo, hi = values.min(0).values, values.max(0).values
    inf = torch.tensor(math.inf)
    low = torch.stack([-inf, lo[1] / margin, -inf, lo[3] / margin])
    high = torch.stack([hi[0] * margin + 0.01, hi[1] * margin, hi[2] * margin + 0.01, inf])
    return low, high
