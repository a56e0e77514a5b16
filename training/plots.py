"""PNG figures drawn with PIL only (no matplotlib): loss curves, image grids, colour maps."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def to_rgb(img: np.ndarray) -> np.ndarray:
    """Network-range image (1 or 3, H, W) in [-1, 1], or uint8 (H, W[, 3]) -> uint8 (H, W, 3)."""
    a = np.asarray(img)
    if a.dtype != np.uint8:
        a = np.clip((a.astype(np.float32) + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
        a = np.moveaxis(a, 0, -1) if a.ndim == 3 else a
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, -1)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, -1)
    return a


def heat(values: np.ndarray, vmax: float | None = None) -> np.ndarray:
    """(H, W) non-negative values -> uint8 RGB on a black-red-yellow-white ramp."""
    v = np.asarray(values, dtype=np.float32)
    vmax = float(vmax) if vmax is not None else max(float(np.percentile(v, 99.5)), 1e-6)
    x = np.clip(v / vmax, 0, 1)
    rgb = np.stack([np.clip(3 * x, 0, 1), np.clip(3 * x - 1, 0, 1), np.clip(3 * x - 2, 0, 1)], -1)
    return (rgb * 255 + 0.5).astype(np.uint8)


def save_grid(rows: list[list[np.ndarray]], path: str | Path, labels: list[str] | None = None, pad: int = 2):
    """Tile uint8 (H, W, 3) images row by row under an optional header of column labels."""
    rows = [[to_rgb(img) for img in row] for row in rows]
    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    top = 14 if labels else 0
    canvas = Image.new("RGB", (ncol * (w + pad) + pad, top + len(rows) * (h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for c, label in enumerate(labels or []):
        draw.text((pad + c * (w + pad) + 2, 1), label, fill=(0, 0, 0), font=font)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            canvas.paste(Image.fromarray(img), (pad + c * (w + pad), top + pad + r * (h + pad)))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return Path(path)


def _smooth(y: np.ndarray, n: int) -> np.ndarray:
    if len(y) < 3 or n < 2:
        return y
    n = min(n, len(y))
    k = np.ones(n) / n
    pad = np.concatenate([np.full(n - 1, y[0]), y])
    return np.convolve(pad, k, "valid")


def loss_curves(csv_path: str | Path, png_path: str | Path, columns: list[str], x: str = "step",
                title: str = "", size=(720, 420), log_y: bool = True):
    """Line chart of CSV columns against `x` (moving-average smoothed, log y when all > 0)."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    xs = np.array([float(r[x]) for r in rows])
    series = {c: np.array([float(r[c]) for r in rows if r.get(c) not in (None, "")]) for c in columns}
    series = {c: _smooth(v, max(1, len(v) // 50)) for c, v in series.items() if len(v) == len(xs)}
    allv = np.concatenate(list(series.values())) if series else np.array([1.0])
    log_y = log_y and bool((allv > 0).all())
    tf = (lambda v: np.log10(v)) if log_y else (lambda v: v)  # noqa: E731
    lo, hi = float(tf(allv).min()), float(tf(allv).max())
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    W, H = size
    L, R, T, B = 70, 150, 30, 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    d.rectangle([L, T, W - R, H - B], outline=(0, 0, 0))
    x0, x1 = float(xs.min()), float(xs.max()) if xs.max() > xs.min() else float(xs.min()) + 1
    px = lambda v: L + (v - x0) / (x1 - x0) * (W - R - L)  # noqa: E731
    py = lambda v: H - B - (v - lo) / (hi - lo) * (H - B - T)  # noqa: E731
    for i in range(5):
        v = lo + (hi - lo) * i / 4
        d.line([L - 4, py(v), L, py(v)], fill=(0, 0, 0))
        d.text((4, py(v) - 6), f"{10 ** v:.3g}" if log_y else f"{v:.3g}", fill=(0, 0, 0), font=font)
        xv = x0 + (x1 - x0) * i / 4
        d.text((px(xv) - 10, H - B + 6), f"{xv:.0f}", fill=(0, 0, 0), font=font)
    d.text((L, 8), title or Path(csv_path).stem, fill=(0, 0, 0), font=font)
    d.text(((W - R + L) // 2 - 10, H - 16), x, fill=(0, 0, 0), font=font)
    for i, (name, ys) in enumerate(series.items()):
        col = COLOURS[i % len(COLOURS)]
        pts = [(px(a), py(b)) for a, b in zip(xs, tf(np.maximum(ys, 1e-12) if log_y else ys)) if math.isfinite(b)]
        if len(pts) > 1:
            d.line(pts, fill=col, width=2)
        d.line([W - R + 10, T + 14 * i + 6, W - R + 30, T + 14 * i + 6], fill=col, width=2)
        d.text((W - R + 34, T + 14 * i), name, fill=(0, 0, 0), font=font)
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    img.save(png_path)
    return Path(png_path)
