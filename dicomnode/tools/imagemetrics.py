"""The paper's image metrics on RGB fusion images in [0, 1] with data_range 1.

PSNR, MSE and MAE over all pixels and channels; SSIM as Wang et al. 2004 with an 11x11 Gaussian
window (sigma 1.5), K1 0.01, K2 0.03, population statistics, computed per channel over the
valid (unpadded) region and averaged over channels: identical to scikit-image's
`structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=1, channel_axis=...)`.

Inputs: numpy arrays or torch tensors shaped (H, W), (C, H, W) or (B, C, H, W), channels first
like the networks. uint8 input is divided by 255. A single image gives a float, a batch a numpy
array of per-image values.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

METRIC_NOTE = ("metrics on RGB fusion in [0,1], data_range=1; PSNR/MSE/MAE over all pixels and channels; "
               "SSIM: 11x11 Gaussian window, sigma 1.5, K1=0.01, K2=0.03, averaged over the 3 channels")


def _bchw(x) -> tuple[torch.Tensor, bool]:
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else torch.as_tensor(x)
    t = t.detach().cpu()
    t = t.double() / 255.0 if t.dtype == torch.uint8 else t.double()
    single = t.ndim < 4
    while t.ndim < 4:
        t = t.unsqueeze(0)
    return t, single


def _out(v: torch.Tensor, single: bool):
    arr = v.numpy()
    return float(arr[0]) if single else arr


def _pair(a, b):
    x, single = _bchw(a)
    y, _ = _bchw(b)
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch: {tuple(x.shape)} vs {tuple(y.shape)}")
    return x, y, single


def mse(a, b):
    x, y, single = _pair(a, b)
    return _out(((x - y) ** 2).mean((1, 2, 3)), single)


def mae(a, b):
    x, y, single = _pair(a, b)
    return _out((x - y).abs().mean((1, 2, 3)), single)


def psnr(a, b, data_range: float = 1.0):
    x, y, single = _pair(a, b)
    m = ((x - y) ** 2).mean((1, 2, 3))
    return _out(10 * torch.log10(data_range ** 2 / m), single)  # inf for identical images


def _gauss(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """The normalised 1-D Gaussian; the 2-D window is its outer product (separable)."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-r ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a, b, data_range: float = 1.0, win: int = 11, sigma: float = 1.5):
    x, y, single = _pair(a, b)
    c = x.shape[1]
    g = _gauss(win, sigma)
    gv, gh = g.view(1, 1, win, 1).expand(c, 1, win, 1), g.view(1, 1, 1, win).expand(c, 1, 1, win)
    # two 1-D passes = the 2-D Gaussian window, 2*11 instead of 121 multiply-adds per pixel in float64;
    # valid region only, as skimage crops
    f = lambda z: F.conv2d(F.conv2d(z, gv, groups=c), gh, groups=c)  # noqa: E731
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx ** 2, f(y * y) - my ** 2, f(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return _out(s.mean((2, 3)).mean(1), single)


def all_metrics(real, fake) -> dict[str, np.ndarray | float]:
    """{'psnr', 'ssim', 'mae', 'mse'} for real vs synthetic, both in [0, 1]."""
    return {"psnr": psnr(real, fake), "ssim": ssim(real, fake), "mae": mae(real, fake), "mse": mse(real, fake)}


def unit_to_01(x):
    """Network range [-1, 1] -> [0, 1] (same layout), for passing outputs to the metrics."""
    return (x + 1) / 2
