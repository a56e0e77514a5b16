"""Shared plumbing for the Pix2Pix/cDDPM training and evaluation commands: split loading (through
training.data.PairedDataset), seeds, devices, CSV logs, progress bars and checkpoints."""

from __future__ import annotations

import copy
import csv
import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn


@dataclass
class Split:
    """One split held in memory: mr (N,1,H,W) and fusion (N,3,H,W) float32 in [-1, 1]."""

    name: str
    mr: torch.Tensor
    fusion: torch.Tensor
    rows: list[dict]          # the pairs.csv rows, in the same order
    manifest: dict

    def __len__(self) -> int:
        return self.mr.shape[0]

    def subset(self, positions: list[int]) -> Split:
        """The pairs at these positions (in this order), same split name and manifest."""
        index = torch.as_tensor(positions, dtype=torch.long)
        return Split(self.name, self.mr[index], self.fusion[index], [self.rows[i] for i in positions], self.manifest)

    def fold_positions(self, folds: int, fold: int) -> list[int]:
        """Positions of the pairs whose patient falls in `fold` of `folds` (`patient_fold`)."""
        return [i for i, r in enumerate(self.rows) if patient_fold(r["patient_id"], folds) == fold]


def patient_fold(patient_id: str, folds: int) -> int:
    """A patient's fold out of `folds`, from a hash of the ID: stable across runs and machines, so
    fold generators and the cDDPM trained on their outputs agree without sharing any state."""
    if folds < 1:
        raise ValueError(f"folds must be >= 1, got {folds}")
    return int.from_bytes(hashlib.sha256(patient_id.encode()).digest()[:8], "big") % folds


def load_split(data_dir: str | Path, split: str, limit: int | None = None) -> Split:
    """The pairs of `split` (at most `limit`, evenly spread) read through training.data.PairedDataset,
    with their pairs.csv rows; held in memory because the training loops sample from it."""
    from training.data import PairedDataset

    data_dir = Path(data_dir)
    ds = PairedDataset(data_dir, split)
    with open(data_dir / "pairs.csv", newline="") as f:
        by_index = {int(r["index"]): r for r in csv.DictReader(f)}
    positions = _spread(list(range(len(ds))), limit) if limit else list(range(len(ds)))
    if not positions:
        raise ValueError(f"{data_dir}: split {split!r} has no pairs")
    items = [ds[i] for i in positions]
    mr = torch.stack([m for m, _, _ in items])
    fusion = torch.stack([f for _, f, _ in items])
    rows = [by_index[int(i)] for _, _, i in items]
    return Split(split, mr, fusion, rows, ds.manifest)


def _spread(rows: list, n: int) -> list:
    """n rows evenly spread over the list (so a subset covers several patients)."""
    if n >= len(rows):
        return rows
    return [rows[int(i)] for i in np.linspace(0, len(rows) - 1, n).round()]


def seed_all(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """--device as the node reads it (dicomnode.synthesize.pick_device): a device this machine
    lacks raises DeviceError, which `python -m training` reports as one sentence."""
    from dicomnode.synthesize import pick_device

    return pick_device(name)


def linear_decay(total: int, decay_start: float):
    """Pix2Pix schedule: constant LR, then linear decay to 0 from `decay_start` (fraction of steps)."""
    start = int(total * decay_start)
    return lambda step: 1.0 if step < start else max(0.0, 1.0 - (step - start) / max(1, total - start))


class CsvLog:
    """Append-only CSV (continues across resumes; rows past the resume step are dropped)."""

    def __init__(self, path: Path, fields: list[str], resume_step: int | None = None):
        self.path, self.fields = Path(path), fields
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="") as f:
                keep = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        else:
            keep = []
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fields)
            w.writeheader()
            w.writerows(keep)

    def write(self, **row):
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.fields).writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def progress(disable: bool = False) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"), disable=disable)


def save_checkpoint(path: Path, state: dict):
    """Write atomically so an interrupted run never leaves a half-written checkpoint."""
    tmp = Path(str(path) + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def lesion_weights(split: Split, weight: float) -> torch.Tensor | None:
    """Sampling weights that draw the pairs of studies with a lesion (pairs.csv `lesion` = 1)
    `weight` times as often as the others; None (plain shuffling) for weight 1. Lesion slices are
    a small minority, and a model that never sees enough of them learns to paint no uptake there."""
    if weight <= 0:
        raise ValueError(f"lesion weight must be positive, got {weight}")
    if weight == 1.0:
        return None
    return torch.tensor([weight if str(r.get("lesion", "")) == "1" else 1.0 for r in split.rows],
                        dtype=torch.float64)


def uptake_map(mr: torch.Tensor, fusion: torch.Tensor) -> torch.Tensor:
    """How much PET colour each fusion pixel carries, in [0, 1] (N,1,H,W).

    A PET/T2FS fusion is rgb = (1 - a) * grey(MR) + a * hot(SUV) with a = 0.5 (docs/user-guide/research/phantom.md);
    removing the grey share leaves the mean of the hot colour map, which rises monotonically with
    SUV from 0 (no uptake) to 1 (white, the top of the SUV window). The MR input is on the same
    0.5..99.5 percentile window as the fusion's grey, so grey = (mr + 1) / 2. On an export with a
    different window this is an approximation, which is all a loss weight needs."""
    grey = (mr.float() + 1.0) / 2.0
    rgb = (fusion.float() + 1.0) / 2.0
    return ((rgb.mean(1, keepdim=True) - 0.5 * grey) / 0.5).clamp(0.0, 1.0)


def uptake_weights(mr: torch.Tensor, fusion: torch.Tensor, weight: float) -> torch.Tensor | None:
    """Per-pixel loss weights 1 + (weight - 1) * u^2, u = `uptake_map` of the real fusion (N,1,H,W);
    None for weight 1 (the plain loss). See `uptake_weighted_l1` for why u^2."""
    if weight <= 0:
        raise ValueError(f"uptake weight must be positive, got {weight}")
    return None if weight == 1.0 else 1.0 + (weight - 1.0) * uptake_map(mr, fusion) ** 2


def uptake_weighted_l1(pred: torch.Tensor, real: torch.Tensor, mr: torch.Tensor, weight: float,
                       weights_from: torch.Tensor | None = None) -> torch.Tensor:
    """L1 with each pixel weighted 1 + (weight - 1) * u^2, u = `uptake_map` of the real fusion, and
    normalised by the weights' sum (so weight 1 is plain L1). Squaring keeps the wide, faint marrow
    uptake (u ~ 0.2) near 1 and puts the weight on hot spots: an infected disc, myocardium, bladder.
    Why: under L1 a rare hot pixel the MR cannot fully explain is predicted at the median, and the
    lesion is under-shown; weighting the hot pixels moves the estimate up there. `weights_from`:
    take u from this fusion instead of `real` (for a loss already reduced to a per-pixel error)."""
    w = uptake_weights(mr, real if weights_from is None else weights_from, weight)
    err = (pred.float() - real.float()).abs()
    if w is None:
        return err.mean()
    return (err * w).sum() / (w.sum() * err.shape[1])


def batches(n: int, batch_size: int, gen: torch.Generator, weights: torch.Tensor | None = None):
    """Endless index batches (epoch after epoch), driven by a seeded generator: each epoch is a
    shuffle of all n items or, with `weights`, n draws with replacement in proportion to them."""
    while True:
        perm = (torch.randperm(n, generator=gen) if weights is None
                else torch.multinomial(weights, n, replacement=True, generator=gen))
        for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            yield perm[i:i + batch_size]


def cpu_bf16_native() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX); elsewhere bf16 is emulated and slow."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(p()) for p in probes if p is not None)


def autocast(device: torch.device, amp: bool):
    """Mixed precision when `amp`: fp16 on CUDA; bf16 on a CPU with native bf16 (1.4-1.9x the
    images/s of fp32 there, bench/bench_train.py); fp32 otherwise."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16, enabled=amp)
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp and device.type == "cpu" and cpu_bf16_native())


M = TypeVar("M", bound=nn.Module)


class EMA(Generic[M]):
    """Exponential moving average of a network's weights (buffers copied), with warm-up."""

    def __init__(self, model: M, decay: float = 0.999):
        self.decay = decay
        self.model: M = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module):
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for mine, theirs in zip(self.model.parameters(), model.parameters()):
            mine.lerp_(theirs.detach(), 1 - d)
        for buf, src in zip(self.model.buffers(), model.buffers()):
            buf.copy_(src)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict):
        self.model.load_state_dict(state["model"])
        self.updates, self.decay = state["updates"], state["decay"]


def init_from_model(model_dir: str | Path, part: str) -> tuple[nn.Module, str, dict]:
    """One network of a model folder ("pix2pix" or "cddpm"), float32 and trainable, its preset and
    the folder's card: the starting point of a fine-tune (`--init`). The folder is verified as
    `dicomnode serve` verifies it (checksums, architecture)."""
    from dicomnode.infer.model import load_model

    if part not in ("pix2pix", "cddpm"):
        raise ValueError(f"part must be pix2pix or cddpm, got {part!r}")
    model = load_model(model_dir, "cpu")
    net = copy.deepcopy(model.generator if part == "pix2pix" else model.denoiser).float().train()
    for p in net.parameters():
        p.requires_grad_(True)
    return net, str(model.card["architecture"][part]["preset"]), model.card
