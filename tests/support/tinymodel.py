"""A tiny random-weights model directory (the models engineer's `save_model` and `tiny` presets).

Random weights: the engine and end-to-end tests check mechanics (ordering, geometry, UIDs,
determinism, DICOM validity, failure handling), never image quality.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pydicom import dcmread

from dicomnode.infer.diffusion import Diffusion
from dicomnode.infer.model import save_model
from dicomnode.infer.nets import build_denoiser, build_generator

TINY_INFERENCE = {"steps": 1, "warm_start": 0.3, "batch_size": 4, "seed": 0}


def make_tiny_model(path: Path, name: str = "tinytest", version: str = "tiny-1") -> Path:
    torch.manual_seed(0)
    save_model(path, build_generator("tiny"), build_denoiser("tiny"), pix2pix_preset="tiny", cddpm_preset="tiny",
               diffusion=Diffusion("cosine", 100, "v"), sampler={"steps": 1, "strength": 0.3}, name=name,
               version=version)
    return Path(path)


def make_calibrated_tiny_model(root: Path) -> Path:
    """The tiny model with its safety gate calibrated on a small phantom data set (24 studies of
    64 x 64 x 8) under `root`: it refuses, for example, a noise series (`noise_series`)."""
    from dicomnode.tools.phantom import generate
    from training.calibrate import calibrate
    from training.data import build_dataset

    generate(root / "export", 24, seed=51, min_matrix=64, max_matrix=64, min_slices=8, max_slices=8, pet_grid="mr")
    build_dataset(root / "export", root / "data", source="fusion-sc", site_key=root / "key", val_fraction=0.25,
                  test_fraction=0.1)
    model = make_tiny_model(root / "tiny")
    calibrate(model, root / "data", command="test")
    return model


def ood_series(root: Path, content: str = "noise") -> list[Path]:
    """A 64 x 64 x 8 phantom series with other `content` under a T2FS header (phantom --content)."""
    from dicomnode.tools.phantom.generate import write_case

    info = write_case(root, 7207, rows=64, cols=64, slices=8, content=content, pet_grid="mr")
    return sorted(map(Path, info["mr"]))


def rotate_series(paths, degrees: float, axis=(0.0, 0.0, 1.0)) -> None:
    """Make a series oblique in place: rotate orientation and positions about `axis` (Rodrigues)."""
    k = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.radians(degrees)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    rot = np.eye(3) + np.sin(a) * kx + (1 - np.cos(a)) * kx @ kx
    for p in paths:
        ds = dcmread(p)
        iop = np.asarray(ds.ImageOrientationPatient, float)
        ds.ImageOrientationPatient = [round(float(v), 6) for v in np.concatenate([rot @ iop[:3], rot @ iop[3:]])]
        ds.ImagePositionPatient = [round(float(v), 4) for v in rot @ np.asarray(ds.ImagePositionPatient, float)]
        ds.save_as(p, enforce_file_format=True)


def slice_location(ds) -> float:
    iop = np.asarray(ds.ImageOrientationPatient, float)
    return float(np.dot(np.cross(iop[:3], iop[3:]), np.asarray(ds.ImagePositionPatient, float)))
