"""Thoraco-lumbar spine anatomy and spondylodiscitis, painted as tissue fractions.

Every structure is a soft-edged shape in spine-aligned coordinates (s along the curved spine,
t antero-posterior from the back of the vertebral bodies, x lateral). Soft edges of about one
voxel make boundary voxels a mixture of tissues (partial volume). Each paint call sets the MR
signal (for the chosen weighting) and the FDG uptake (SUV) of the same tissue, so MR and PET
share one anatomy but carry independent values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from dicomnode.tools.phantom.grid import SliceGrid

# Relative MR signal per tissue for each weighting: T2 fat-sat, T1, STIR.
TISSUE = {
    "air": (0.0, 0.0, 0.0),
    "fat": (0.07, 0.95, 0.05),
    "skin": (0.30, 0.50, 0.30),
    "muscle": (0.20, 0.35, 0.22),
    "marrow": (0.16, 0.70, 0.15),
    "cortex": (0.04, 0.05, 0.04),
    "annulus": (0.14, 0.30, 0.16),
    "nucleus": (0.78, 0.33, 0.82),
    "csf": (1.00, 0.10, 1.00),
    "cord": (0.45, 0.45, 0.45),
    "roots": (0.55, 0.35, 0.55),
    "abdomen": (0.30, 0.45, 0.30),
    "fluid": (0.85, 0.10, 0.90),
    "lung": (0.03, 0.03, 0.03),
    "mediastinum": (0.25, 0.50, 0.25),
    "vessel": (0.04, 0.12, 0.04),
    "ligament": (0.05, 0.10, 0.05),
    "edema": (0.62, 0.22, 0.70),
    "pus": (0.95, 0.15, 0.95),
    "rim": (0.45, 0.40, 0.50),
    "infected_disc": (0.85, 0.20, 0.90),
}
# T2 without fat suppression: as T2FS, but fat and fatty tissue bright (only as content that a
# header calls T2FS: an input the safety gate must catch).
_T2_FAT = {"fat": 0.80, "marrow": 0.45, "skin": 0.45, "abdomen": 0.40, "mediastinum": 0.45}
TISSUE = {name: (*values, _T2_FAT.get(name, values[0])) for name, values in TISSUE.items()}
WEIGHTINGS = ("T2FS", "T1", "STIR", "T2")

# Vertebrae from the sacrum upwards with typical body heights (mm) and the disc above each.
LEVELS = ["S1", "L5", "L4", "L3", "L2", "L1"] + [f"T{i}" for i in range(12, 0, -1)]
_BODY_H = [60, 27, 28, 28, 27, 26, 24, 23, 22, 21, 20, 19.5, 19, 18.5, 18, 17.5, 17, 16]
_DISC_H = [9.5, 11, 11, 10, 9, 7, 5.5, 5, 5, 4.5, 4.5, 4, 4, 4, 4, 4, 4]


def ramp(d: np.ndarray, w: float) -> np.ndarray:
    """Fraction of a voxel of size w inside a shape at signed distance d (negative = inside)."""
    return np.clip(np.float32(0.5) - d / np.float32(w), 0.0, 1.0).astype(np.float32, copy=False)


def box(*terms: tuple[np.ndarray, float]) -> np.ndarray:
    """Signed distance (mm, Chebyshev) of an axis-aligned box given (offset, half size) terms."""
    out = None
    for off, half in terms:
        d = np.abs(off) - np.float32(half)
        out = d if out is None else np.maximum(out, d)
    return out


def ellipsoid(*terms: tuple[np.ndarray, float], p: int = 2) -> np.ndarray:
    """Approximate signed distance (mm) of an ellipsoid (p=2) or a squarer superellipsoid (p=4)
    given (offset, radius) terms."""
    acc = rmin = None
    for off, r in terms:
        r = np.asarray(r, dtype=np.float32)
        v = off / r
        v = v * v
        if p == 4:
            v = v * v
        acc = v if acc is None else acc + v
        rmin = r if rmin is None else np.minimum(rmin, r)
    root = np.sqrt(acc)
    if p == 4:
        root = np.sqrt(root)
    return (root - 1.0) * rmin


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], cell: tuple[float, ...]) -> np.ndarray:
    """Smooth random texture in about [-1, 1] with feature size `cell` voxels per axis.

    Coarse Gaussian noise, linearly upsampled by one small matrix product per axis (cheap).
    """
    out = rng.standard_normal(tuple(max(2, int(np.ceil(n / c)) + 1) for n, c in zip(shape, cell)))
    out = out.astype(np.float32)
    for axis, n in enumerate(shape):
        m = out.shape[axis]
        pos = np.linspace(0, m - 1, n, dtype=np.float32)
        lo = np.minimum(pos.astype(int), m - 2)
        frac = pos - lo
        mat = np.zeros((n, m), np.float32)
        mat[np.arange(n), lo] = 1 - frac
        mat[np.arange(n), lo + 1] = frac
        out = np.moveaxis(np.tensordot(mat, out, axes=([1], [axis])), 0, axis)
    return np.tanh(out * 0.8).astype(np.float32)


@dataclass
class Anatomy:
    """One patient's spine: shared by all of that patient's studies."""

    scale: float
    kyphosis: float
    lordosis: float
    scoliosis: float
    scoliosis_phase: float
    body_h: np.ndarray
    disc_h: np.ndarray
    depth: np.ndarray  # AP depth of each vertebral body
    width: np.ndarray  # lateral half width
    nucleus: np.ndarray  # nucleus brightness of each disc (degeneration)
    canal_ap: float
    canal_w: float
    conus_offset: float
    back_fat: float
    muscle_depth: float
    marrow_suv: float
    muscle_suv: float
    bowel_suv: float
    lesion_disc: int  # index into discs (disc above vertebra i is disc i)
    modic_disc: int
    belly: float  # distance from the front of the vertebral bodies to the anterior skin
    half_width: float  # lateral half width of the trunk
    heart_suv: float
    # Drawn independently of everything the MR shows: no MR-only model can know them.
    HIDDEN_UPTAKE: ClassVar[tuple[str, ...]] = ("marrow_suv", "muscle_suv", "bowel_suv", "heart_suv")

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "Anatomy":
        n = len(LEVELS)
        scale = rng.uniform(0.9, 1.1)
        body_h = np.array(_BODY_H) * scale * rng.uniform(0.95, 1.05, n)
        disc_h = np.array(_DISC_H) * scale * rng.uniform(0.6, 1.1, n - 1)
        lum = np.clip((np.arange(n) - 1) / 8.0, 0, 1)  # 0 lumbar .. 1 mid thoracic
        depth = (34 - 8 * lum) * scale * rng.uniform(0.95, 1.05)
        width = (24 - 7 * lum) * scale * rng.uniform(0.95, 1.05)
        nucleus = np.clip(rng.beta(5, 2, n - 1) * 1.1, 0.25, 1.0)
        # Infection favours the lumbar and lower thoracic discs, as in the clinical series.
        p = np.array([6, 12, 14, 12, 10, 9, 7, 6, 5, 4, 3, 2, 1, 1, 1, 1, 1], dtype=float)
        lesion_disc = int(rng.choice(n - 1, p=p / p.sum()))
        modic_disc = int(rng.choice([i for i in range(1, 6) if i != lesion_disc]))
        return cls(scale=scale, kyphosis=rng.uniform(5, 28), lordosis=rng.uniform(5, 30),
                   scoliosis=rng.uniform(0, 6), scoliosis_phase=rng.uniform(0, 2 * np.pi),
                   body_h=body_h, disc_h=disc_h, depth=depth, width=width, nucleus=nucleus,
                   canal_ap=rng.uniform(13, 17), canal_w=rng.uniform(10, 12.5),
                   conus_offset=rng.uniform(-20, 20), back_fat=rng.uniform(8, 40),
                   muscle_depth=rng.uniform(45, 70), marrow_suv=rng.uniform(1.3, 2.4),
                   muscle_suv=rng.uniform(0.6, 1.0), bowel_suv=rng.uniform(0.9, 1.5),
                   lesion_disc=lesion_disc, modic_disc=modic_disc, belly=rng.uniform(110, 200),
                   half_width=rng.uniform(130, 170),
                   heart_suv=float(rng.choice([1.5, 3.0, 8.0]) * rng.uniform(0.8, 1.3)))

    # --- the curved spine -------------------------------------------------------------------
    def centre_y(self, z: np.ndarray) -> np.ndarray:
        """AP position of the posterior body wall: lumbar lordosis, thoracic kyphosis, sacrum."""
        z = np.asarray(z, dtype=np.float64)
        y = (-self.lordosis * np.exp(-((z - 110) / 95) ** 2) + self.kyphosis * np.exp(-((z - 420) / 150) ** 2))
        return y + np.where(z < 0, 0.004 * z ** 2, 0.0)

    def centre_x(self, z: np.ndarray) -> np.ndarray:
        return self.scoliosis * np.sin(2 * np.pi * np.asarray(z, dtype=np.float64) / 520 + self.scoliosis_phase)

    def boundaries(self, disc_loss: float = 1.0) -> np.ndarray:
        """s of every segment boundary: sacrum, disc, L5, disc, ... (s=0 at S1's top endplate)."""
        heights = []
        for i in range(len(LEVELS)):
            heights.append(self.body_h[i])
            if i < len(LEVELS) - 1:
                heights.append(self.disc_h[i] * (disc_loss if i == self.lesion_disc else 1.0))
        return np.concatenate([[-self.body_h[0]], -self.body_h[0] + np.cumsum(heights)])

    def disc_s(self, disc: int) -> float:
        """s of the centre of disc `disc` (0 = L5/S1)."""
        b = self.boundaries()
        return float((b[2 * disc + 1] + b[2 * disc + 2]) / 2)

    def level_s(self, level: str) -> float:
        """s of the centre of a vertebral body (used to place the field of view)."""
        b = self.boundaries()
        i = LEVELS.index(level)
        return float((b[2 * i] + b[2 * i + 1]) / 2)


@dataclass
class Lesion:
    """Pyogenic spondylodiscitis at one disc. MR look and FDG uptake are drawn independently."""

    suv_peak: float  # true peak SUV before PET blur and noise
    disc_loss: float
    edema_amp: float
    edema_len: float
    uptake_len: float
    uptake_shift: tuple[float, float]
    paravertebral: tuple[float, ...] | None  # (ds, xl, rs, rt, rx)
    epidural: tuple[float, ...] | None  # (ds, rs, rt, rx)
    abscess_suv: float
    seed: int
    HIDDEN_UPTAKE: ClassVar[tuple[str, ...]] = ("suv_peak", "uptake_len", "uptake_shift", "abscess_suv")

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "Lesion":
        para = None
        if rng.random() < 0.6:
            para = (rng.uniform(-8, 8), rng.choice([-1, 1]) * rng.uniform(0, 14), rng.uniform(12, 32),
                    rng.uniform(5, 13), rng.uniform(8, 18))
        epi = (rng.uniform(-8, 8), rng.uniform(9, 22), rng.uniform(2.0, 4.0), rng.uniform(6, 9)) \
            if rng.random() < 0.35 else None
        return cls(suv_peak=float(np.clip(rng.lognormal(np.log(6.5), 0.45), 2.5, 18.0)),
                   disc_loss=rng.uniform(0.35, 0.9), edema_amp=rng.uniform(0.35, 0.95),
                   edema_len=rng.uniform(4, 16), uptake_len=rng.uniform(3, 14),
                   uptake_shift=(rng.uniform(-0.35, 0.15), rng.uniform(-8, 8)),
                   paravertebral=para, epidural=epi, abscess_suv=rng.uniform(0.3, 0.9),
                   seed=int(rng.integers(2**31)))


@dataclass
class Painted:
    """Clean MR signal (relative), true SUV, the lesion mask and the spine mask (the vertebral
    bodies and discs) on the slice grid."""

    mr: np.ndarray
    suv: np.ndarray
    lesion_mask: np.ndarray
    spine_mask: np.ndarray
    meta: dict = field(default_factory=dict)


class _Canvas:
    def __init__(self, shape, weighting: str):
        self.mr = np.zeros(shape, np.float32)
        self.suv = np.zeros(shape, np.float32)
        self.w = WEIGHTINGS.index(weighting)

    def paint(self, frac, tissue: str | None, suv, mr=None) -> None:
        value = TISSUE[tissue][self.w] if mr is None else mr
        frac = np.asarray(frac, dtype=np.float32)
        for arr, v in ((self.mr, value), (self.suv, suv)):  # arr += frac * (v - arr), in place
            d = np.subtract(np.float32(v) if np.isscalar(v) else v, arr, dtype=np.float32)
            d *= frac
            arr += d

    def bone(self, d, w, marrow_suv, margin=1.2) -> None:
        self.paint(ramp(d, w), "cortex", marrow_suv * 0.5)
        self.paint(ramp(d + margin, w), "marrow", marrow_suv)

    def crop(self, box: tuple[slice, ...]) -> "_Canvas":
        """The same canvas restricted to a box (numpy views: paints go through)."""
        sub = _Canvas.__new__(_Canvas)
        sub.mr, sub.suv, sub.w = self.mr[box], self.suv[box], self.w
        return sub


class _Coords:
    """Per-voxel spine coordinates and level attributes (broadcastable arrays), croppable to a box
    so that each structure is computed only where it can be."""

    names = ("s", "t", "xl", "seg", "u", "h", "lvl", "D", "W", "tex")

    def __init__(self, **arrays):
        self.__dict__.update(arrays)

    def region(self, tlo: float, thi: float, slo: float = -np.inf, shi: float = np.inf) -> tuple[slice, ...]:
        """Smallest index box holding every voxel with tlo <= t <= thi and slo <= s <= shi."""
        m = (self.t >= tlo) & (self.t <= thi) & (self.s >= slo) & (self.s <= shi)
        box = []
        for axis in range(3):
            if m.shape[axis] == 1:
                box.append(slice(None))
                continue
            hit = np.flatnonzero(m.any(axis=tuple(a for a in range(3) if a != axis)))
            box.append(slice(int(hit[0]), int(hit[-1]) + 1) if len(hit) else slice(0, 0))
        return tuple(box)

    def crop(self, box: tuple[slice, ...]) -> "_Coords":
        return _Coords(**{n: _crop(getattr(self, n), box) for n in self.names})


def _crop(a: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    a = np.asarray(a)
    return a[tuple(b if a.shape[i] > 1 else slice(None) for i, b in enumerate(box))]


def paint_case(anat: Anatomy, grid: SliceGrid, weighting: str, lesion: Lesion | None,
               modic: bool, rng: np.random.Generator) -> Painted:
    """Render one study: the patient's anatomy on `grid`, optionally with a lesion."""
    X, Y, Z = grid.coords()
    shape = grid.shape
    w2 = float(min(grid.row_spacing, grid.col_spacing))  # in-plane partial-volume width
    w3 = 0.5 * (w2 + grid.thickness)  # for shapes cut obliquely by the slab
    M = w3 + 2.0  # margin of a structure's box beyond its nominal extent
    # Spine-aligned coordinates: s along the curve, t across it, xl lateral.
    zz = np.linspace(-200, 800, 2001)
    yc = anat.centre_y(zz)
    dydz = np.gradient(yc, zz)
    arc = np.concatenate([[0], np.cumsum(np.sqrt(1 + dydz[1:] ** 2) * np.diff(zz))])
    arc -= np.interp(0.0, zz, arc)
    ycz = np.interp(Z, zz, yc).astype(np.float32)
    sin_t = np.interp(Z, zz, dydz / np.sqrt(1 + dydz ** 2)).astype(np.float32)
    cos_t = np.sqrt(1 - sin_t ** 2)
    dy = Y - ycz
    s = (np.interp(Z, zz, arc).astype(np.float32) + dy * sin_t).astype(np.float32)
    t = (dy * cos_t).astype(np.float32)
    xl = (X - anat.centre_x(Z).astype(np.float32)).astype(np.float32)

    c = _Canvas(shape, weighting)
    B = anat.boundaries(lesion.disc_loss if lesion is not None else 1.0)
    nseg = len(B) - 1
    seg = np.clip(np.searchsorted(B, s, side="right") - 1, 0, nseg - 1)
    u = s - B[seg].astype(np.float32)
    h = np.diff(B).astype(np.float32)[seg]
    lvl = seg // 2
    D = anat.depth.astype(np.float32)[lvl]
    W = anat.width.astype(np.float32)[lvl]
    Dc, Wc = np.float32(anat.canal_ap), np.float32(anat.canal_w)
    Dmin, Dmax = float(anat.depth.min()), float(anat.depth.max())
    s_L1 = anat.level_s("L1")
    s_dia = anat.level_s("T12") + 10

    # Trunk: thorax above the diaphragm, abdomen below; posterior fat and skin.
    t_back = Dc + anat.muscle_depth + anat.back_fat
    tex = smooth_field(rng, shape, (3, 6 / grid.row_spacing, 6 / grid.col_spacing))
    above = ramp(s_dia + 0.35 * np.maximum(-t - D, 0) - s, w2)
    t_front = -float(anat.depth.mean()) - anat.belly
    half_ap = (t_back - t_front) / 2
    trunk_d = ellipsoid((t - (t_back - half_ap), half_ap), (xl, anat.half_width), p=4)
    trunk = ramp(trunk_d, w3)
    c.paint(trunk, "fat", 0.35)
    front = ramp(t - 2.0, w2) * ramp(trunk_d + 12.0, w3)  # trunk contents: in front of the canal
    c.paint(front * (1 - above), "abdomen", anat.bowel_suv,
            mr=TISSUE["abdomen"][c.w] * (1 + 0.12 * tex))
    loops = smooth_field(rng, shape, (4, 14 / grid.row_spacing, 14 / grid.col_spacing))
    bowel = ramp(-(loops - 0.55) * 12, 1.0) * ramp(t + D + 30, w2) * (1 - above) * front
    c.paint(bowel, "fluid", anat.bowel_suv * 0.6)
    c.paint(above * ramp(t + D + 22, w2) * front, "lung", 0.4)
    c.paint(above * ramp(-(t + D + 22), w2) * ramp(t - 0, w2), "mediastinum", 1.4)
    c.paint(trunk - ramp(trunk_d + 2.0, w3), "skin", 0.8)
    # Paraspinal muscles (erector spinae, multifidus).
    c.paint(ramp(box((t - (Dc + anat.muscle_depth / 2), anat.muscle_depth / 2), (xl, 75.0)), w3), "muscle",
            anat.muscle_suv, mr=TISSUE["muscle"][c.w] * (1 + 0.12 * tex))
    K = _Coords(s=s, t=t, xl=xl, seg=seg, u=u, h=h, lvl=lvl, D=D, W=W, tex=tex)

    # Heart in front of the mid-thoracic spine, resting on the diaphragm: grey myocardium around
    # dark (black-blood) cavities, myocardial FDG uptake that varies widely between patients.
    s_h = s_dia + 22 + 40
    bx = K.region(-Dmax - 65 - 50 - M, -Dmin - 65 + 50 + M, s_h - 58 - M, s_h + 58 + M)
    k, cc = K.crop(bx), c.crop(bx)
    lim = _crop(above, bx) * _crop(front, bx)
    hc = (k.s - s_h, k.t + k.D + 65, k.xl - 25)
    cc.paint(lim * ramp(ellipsoid((hc[0], 58.0), (hc[1], 50.0), (hc[2], 55.0)), w3), "muscle",
             anat.heart_suv, mr=TISSUE["muscle"][c.w] * 1.3)
    cc.paint(lim * ramp(ellipsoid((hc[0], 47.0), (hc[1], 40.0), (hc[2], 45.0)), w3), "vessel", 1.6)
    del lim, hc, above, front, trunk, trunk_d, bowel, loops

    # Psoas muscles beside the lumbar bodies.
    k, cc = K.crop(bx := K.region(-0.55 * Dmax - 17 - M, -0.55 * Dmin + 17 + M, -np.inf, s_L1 + 40 + M)), c.crop(bx)
    psoas_r = np.clip((s_L1 + 40 - k.s) / 8, 0, 16).astype(np.float32)
    for side in (-1, 1):
        cc.paint(ramp(ellipsoid((k.t + k.D * 0.55, psoas_r + 1e-3),
                                (k.xl - side * (k.W + psoas_r + 2), psoas_r + 1e-3)), w3) * (psoas_r > 0),
                 "muscle", anat.muscle_suv)

    # Posterior elements: laminae, spinous processes (sloping caudally), pedicles, facet pillars.
    k, cc = K.crop(bx := K.region(-2 - M, float(Dc) + 40 + M)), c.crop(bx)
    vb0, vb1 = B[0::2], B[1::2]
    vc = ((vb0 + vb1) / 2).astype(np.float32)
    vh = (vb1 - vb0).astype(np.float32)
    slope = np.where(k.s > s_L1, 0.9, 0.35).astype(np.float32)
    sp = k.s + slope * np.maximum(k.t - Dc, 0)
    iv = np.clip(np.searchsorted((vc[1:] + vc[:-1]) / 2, sp), 0, len(vc) - 1)
    up, hp = sp - vc[iv], vh[iv]
    lam = box((up + 0.15 * hp, 0.32 * hp), (k.t - (Dc + 3.0), 3.0), (k.xl, Wc + 9))
    spin_len = np.where(k.s > s_L1, 24.0, 30.0).astype(np.float32) * anat.scale
    spin = box((up + 0.1 * hp, 0.22 * hp), (k.t - (Dc + 3 + spin_len / 2), spin_len / 2), (k.xl, 3.5))
    pillar = box((k.t - (Dc + 3), 6.0), (np.abs(k.xl) - (Wc + 8.5), 5.5))
    ped = box((k.s - vc[np.clip(np.searchsorted((vc[1:] + vc[:-1]) / 2, k.s), 0, len(vc) - 1)] - 0.15 * k.h,
               0.2 * k.h), (k.t - Dc / 2, Dc / 2 + 1), (np.abs(k.xl) - (Wc + 3.5), 3.5))
    cc.paint(ramp(np.minimum(lam, spin) - 3.0, w3), "ligament", anat.muscle_suv)  # interspinous
    cc.bone(np.minimum(np.minimum(lam, spin), np.minimum(pillar, ped)), w3, anat.marrow_suv)
    facet = ramp(box((np.abs(up) - 0.5 * hp - 1.5, 0.9), (k.t - (Dc + 3), 5.0), (np.abs(k.xl) - (Wc + 8.5), 4.5)), w3)
    cc.paint(facet, "fluid", 0.8, mr=TISSUE["fluid"][c.w] * 0.7)
    del lam, spin, pillar, ped, facet, sp, up, hp, iv, slope, spin_len

    # Spinal canal: epidural fat, dural sac (CSF), cord down to the conus, then cauda equina.
    k, cc = K.crop(bx := K.region(-M, float(Dc) + M)), c.crop(bx)
    canal = ramp(ellipsoid((k.t - Dc / 2, Dc / 2), (k.xl, Wc), p=4), w3)
    cc.paint(canal, "fat", 0.3)
    cc.paint(ramp(ellipsoid((k.t - Dc / 2 + 0.5, Dc / 2 - 1.7), (k.xl, Wc - 1.0), p=2), w3), "csf", 0.3)
    conus = s_L1 + anat.conus_offset
    taper = np.clip((k.s - conus) / 25, 0, 1).astype(np.float32)
    cord_r = 4.5 * taper + 1e-3
    cc.paint(ramp(ellipsoid((k.t - Dc * 0.45, cord_r), (k.xl, cord_r * 1.3)), w3) * (taper > 0), "cord", 1.2)
    roots = (k.s < conus) * ramp(ellipsoid((k.t - Dc * 0.68, Dc * 0.18), (k.xl, Wc * 0.6)), w3)
    cc.paint(roots * (0.5 + 0.5 * np.cos(k.xl * 2.3) ** 2), "roots", 0.9)
    del canal, taper, cord_r, roots

    # Vertebral bodies and discs share one column; endplates are cortical lines.
    bx_col = K.region(-Dmax - M, M)
    k, cc = K.crop(bx_col), c.crop(bx_col)
    e = np.minimum(k.u, k.h - k.u)
    is_vert = (k.seg % 2 == 0)
    sd = np.where(is_vert, -e, e).astype(np.float32)
    ax = ellipsoid((k.t + k.D / 2, k.D / 2), (k.xl, k.W), p=4)
    col = ramp(ax, w3)
    spine_mask = np.zeros(shape, bool)
    spine_mask[bx_col] = np.broadcast_to(col > 0.5, spine_mask[bx_col].shape)
    vfrac = ramp(sd, w2)
    cc.paint(col * vfrac, "cortex", anat.marrow_suv * 0.5)
    cc.paint(ramp(ax + 1.5, w3) * ramp(sd + 1.2, w2), "marrow", anat.marrow_suv,
             mr=TISSUE["marrow"][c.w] * (1 + 0.15 * k.tex))
    cc.paint(col * (1 - vfrac), "annulus", 0.6)
    disc_idx = np.clip((k.seg - 1) // 2, 0, len(anat.nucleus) - 1)
    nuc = ramp(ellipsoid((k.t + 0.45 * k.D, 0.33 * k.D), ((k.u - k.h / 2), 0.42 * k.h + 0.3), (k.xl, 0.6 * k.W)), w3)
    cleft = 1 - 0.5 * np.exp(-((k.u - k.h / 2) / 0.7) ** 2)
    cc.paint(nuc * (1 - vfrac) * (~is_vert), "nucleus", 0.7,
             mr=TISSUE["nucleus"][c.w] * anat.nucleus.astype(np.float32)[disc_idx] * cleft)
    cc.paint(ramp(ellipsoid((k.t + 5, 3.5), (k.u - k.h / 2, 1.8), (k.xl, 2.5)), w3) * is_vert, "fluid", 1.5,
             mr=TISSUE["fluid"][c.w] * 0.6)  # basivertebral vein
    del e, sd, ax, vfrac, disc_idx, nuc, cleft

    # Great vessels in front of the spine (flow voids, blood-pool uptake).
    k, cc = K.crop(bx := K.region(-Dmax - 25 - M, -Dmin - 3 + M)), c.crop(bx)
    for side, r in ((1, 10.0), (-1, 11.0)):
        cc.paint(ramp(ellipsoid((k.t + k.D + r + 3, r), (k.xl - side * (r + 6), r)), w3), "vessel", 1.6)

    lesion_mask = np.zeros(shape, bool)
    meta: dict = {}
    disc_segs = np.arange(1, nseg, 2)

    def disc_centre(i: int) -> tuple[float, float, float]:
        j = disc_segs[i]
        return float((B[j] + B[j + 1]) / 2), float(B[j + 1] - B[j]), float(anat.depth[i])

    def near_disc(sdc: float, hd: float, reach: float):
        """Column box (coords, canvas, oedema-capable column fraction) around one disc."""
        bx = K.region(-Dmax - 45 - M, float(Dc) + 10 + M, sdc - hd / 2 - reach - M, sdc + hd / 2 + reach + M)
        kk = K.crop(bx)
        colk = ramp(ellipsoid((kk.t + kk.D / 2, kk.D / 2), (kk.xl, kk.W), p=4), w3)
        return bx, kk, c.crop(bx), colk

    if modic:  # degenerative (Modic 1) oedema: looks inflammatory, little FDG uptake
        sdc, hd, _ = disc_centre(anat.modic_disc)
        bx, k, cc, colk = near_disc(sdc, hd, 45.0)
        prof = np.exp(-np.maximum(np.abs(k.s - sdc) - hd / 2, 0) / 6.0) * (k.seg % 2 == 0)
        cc.paint(colk * prof * 0.5, "edema", anat.marrow_suv * rng.uniform(1.1, 1.5))
    if lesion is not None:
        lr = np.random.default_rng(lesion.seed)
        sdc, hd, Dd = disc_centre(anat.lesion_disc)
        bx, k, cc, col = near_disc(sdc, hd, 50.0)
        lm = lesion_mask[bx]
        sub = cc.mr.shape
        f1 = smooth_field(lr, sub, (2, 4 / grid.row_spacing, 4 / grid.col_spacing))
        f2 = smooth_field(lr, sub, (2, 5 / grid.row_spacing, 5 / grid.col_spacing))
        es = k.s - sdc
        near = np.abs(es) < hd / 2 + 45
        # Oedema of both adjacent bodies, graded from the endplates; endplate erosion.
        dist = np.maximum(np.abs(es) - hd / 2, 0)
        edema = near * col * lesion.edema_amp * np.exp(-dist / lesion.edema_len) * (0.75 + 0.25 * f1)
        cc.paint(edema, "edema", anat.marrow_suv)
        erosion = 1.5 + 1.5 * f1
        disc = ramp(np.abs(es) - hd / 2 - erosion, w2) * col
        cc.paint(disc, "infected_disc", 1.0, mr=TISSUE["infected_disc"][c.w] * (0.85 + 0.15 * f2))
        lm |= (edema > 0.15) | (disc > 0.5)
        # FDG: own extent, own centre, own texture, own peak -- not derived from the T2 signal.
        uptake = (near * col * np.exp(-dist / lesion.uptake_len)
                  * np.exp(-((k.t + Dd * (0.5 + lesion.uptake_shift[0])) / (0.45 * Dd)) ** 2)
                  * np.exp(-((k.xl - lesion.uptake_shift[1]) / 22.0) ** 2) * (0.7 + 0.3 * f2))
        if lesion.paravertebral is not None:
            ds_, xa, rs, rt, rx = lesion.paravertebral
            ab = ellipsoid((es - ds_, rs), (k.t + Dd + rt * 0.6, rt), (k.xl - xa, rx))
            cc.paint(ramp(ab, w3), "rim", 1.0)
            cc.paint(ramp(ab + 2.5, w3), "pus", 1.0)
            rim = np.exp(-((ab + 1.5) / 1.8) ** 2)
            uptake = np.maximum(uptake, rim * lesion.abscess_suv)
            lm |= ab < 0
        if lesion.epidural is not None:
            ds_, rs, rt, rx = lesion.epidural
            ep = ellipsoid((es - ds_, rs), (k.t - rt - 0.3, rt), (k.xl, rx))
            cc.paint(ramp(ep, w3), "pus", 1.0, mr=TISSUE["pus"][c.w] * 0.85)
            uptake = np.maximum(uptake, np.exp(-((ep + 1.0) / 1.5) ** 2) * lesion.abscess_suv * 0.8)
            lm |= ep < 0
        uptake = np.broadcast_to(uptake, sub)
        peak = float(uptake.max()) if uptake.size else 0.0
        if peak > 0:
            np.maximum(cc.suv, (uptake / peak * np.float32(lesion.suv_peak)).astype(np.float32), out=cc.suv)
        lm |= uptake > 0.3 * max(peak, 1e-6)
        meta["lesion_level"] = f"{LEVELS[anat.lesion_disc + 1]}/{LEVELS[anat.lesion_disc]}"
    return Painted(mr=c.mr, suv=c.suv, lesion_mask=lesion_mask, spine_mask=spine_mask, meta=meta)
