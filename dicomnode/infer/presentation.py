"""The model's output is a fusion of the *input* MR: keep its grey exact and its PET part plausible.

The training fusions are rendered as rgb = (1 - opacity) * grey + opacity * hot(SUV)
(dicomnode/tools/fusion.py): grey is the T2FS through its 0.5..99.5 percentile window,
which is exactly the network input (`normalize_series`, [-1, 1]) mapped to [0, 1]. So the grey
part of any fusion of this MR is known, and only the PET colour part is predicted. A card's
`output` block (`OutputSpec`) declares that presentation; `finish_fusion` then

1. takes the PET part h = (rgb - (1 - opacity) * grey) / opacity;
2. smooths it with a Gaussian of `pet_sigma_px` grid pixels: finer than the PET's own
   resolution, so what it removes is texture the generator drew, which the MR cannot predict
   and which costs about twice its variance in squared error against the real PET;
3. projects every pixel onto the colours a mean of 'hot' colour-map values can take,
   1 >= r >= g >= b >= 0 (the map's convex hull). The real fusion's PET part lies in that set, so
   this step never moves a pixel further from it;
4. sets a black level, `pet_floor`: PET colour below it is shown as none and the rest is
   stretched back to the map's top, (h - floor) / (1 - floor) clipped at 0 (it keeps the order
   r >= g >= b, so the result stays in the hull). Where the model cannot tell whether there is any
   uptake at all (air, cortical bone, the edge of the body) the mean of its samples is a faint
   haze that the real PET does not have; a reader sees it as background uptake;
5. recomposes with the exact grey.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

COLORMAPS = ("hot",)


@dataclass(frozen=True)
class OutputSpec:
    """The card's `output` block: how the training fusions were rendered, and the PET smoothing."""

    colormap: str
    opacity: float
    pet_sigma_px: float
    pet_floor: float = 0.0

    def __post_init__(self):
        if self.colormap not in COLORMAPS:
            raise ValueError(f"colormap {self.colormap!r} is not supported (known: {list(COLORMAPS)})")
        if not 0.0 < self.opacity <= 1.0:
            raise ValueError(f"opacity must be in (0, 1], not {self.opacity!r}")
        if not 0.0 <= self.pet_sigma_px <= 8.0:
            raise ValueError(f"pet_sigma_px must be in [0, 8] grid pixels, not {self.pet_sigma_px!r}")
        if not 0.0 <= self.pet_floor <= 0.2:
            raise ValueError(f"pet_floor must be in [0, 0.2] (a share of the colour map), not {self.pet_floor!r}")

    @classmethod
    def from_card(cls, block: dict) -> OutputSpec:
        unknown = set(block) - {"colormap", "opacity", "pet_sigma_px", "pet_floor", "selected_on"}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}")
        try:
            return cls(str(block["colormap"]), float(block["opacity"]), float(block["pet_sigma_px"]),
                       float(block.get("pet_floor", 0.0)))
        except KeyError as e:
            raise ValueError(f"missing key {e.args[0]!r}") from None


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) over H and W, reflecting at the border."""
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    y = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def project_hot_hull(h: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each pixel's (r, g, b) in (B, 3, H, W) onto 1 >= r >= g >= b >= 0.

    The projection onto the order cone r >= g >= b pools adjacent channels; in three dimensions the
    answer is whichever of the four poolings is ordered and nearest. Clipping that to [0, 1] gives
    the projection onto the cone within the box (equal bounds on every channel)."""
    r, g, b = h.unbind(1)
    rg, gb, rgb = (r + g) / 2, (g + b) / 2, (r + g + b) / 3
    candidates = torch.stack([torch.stack(c, 1) for c in
                              ((r, g, b), (rg, rg, b), (r, gb, gb), (rgb, rgb, rgb))])  # (4, B, 3, H, W)
    ordered = (candidates[:, :, 0] >= candidates[:, :, 1]) & (candidates[:, :, 1] >= candidates[:, :, 2])
    dist = ((candidates - h) ** 2).sum(2).masked_fill(~ordered, math.inf)  # the pooled-all one is always ordered
    best = dist.argmin(0, keepdim=True)[:, :, None].expand(1, -1, 3, -1, -1)
    return candidates.gather(0, best)[0].clamp(0, 1)


def finish_fusion(rgb: torch.Tensor, mr: torch.Tensor, spec: OutputSpec) -> torch.Tensor:
    """rgb (B, 3, H, W) and the input mr (B, 1, H, W), both in [-1, 1] -> the finished fusion in [-1, 1]."""
    grey = (1 - spec.opacity) * (mr.float() + 1) / 2
    pet = ((rgb.float() + 1) / 2 - grey) / spec.opacity
    pet = project_hot_hull(gaussian_blur(pet.contiguous(), spec.pet_sigma_px))
    if spec.pet_floor > 0:
        pet = ((pet - spec.pet_floor) / (1 - spec.pet_floor)).clamp(min=0)
    return ((grey + spec.opacity * pet) * 2 - 1).clamp(-1, 1)
