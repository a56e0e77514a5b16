"""Gaussian diffusion for the cDDPM: noise schedules, the forward process, the training loss and
the samplers.

Samplers: `ddpm` is the ancestral sampler over the full schedule (the paper-faithful baseline);
`ddim` (eta 0) and `dpmpp2m` (DPM-Solver++ 2M) are deterministic given the starting noise and
reach good quality in a handful of network evaluations. Any sampler can warm-start from an
initial image (the Pix2Pix output) noised to `strength` in (0, 1] of the schedule, so a
refinement of a good first guess needs only a few evaluations (SDEdit-style).
All randomness comes from a CPU `torch.Generator` seeded by the caller, so results are the same
for a seed on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

SAMPLERS = ("ddpm", "ddim", "dpmpp2m")


def make_betas(schedule: str = "cosine", timesteps: int = 1000) -> torch.Tensor:
    """Linear (Ho et al., scaled to T) or cosine (Nichol & Dhariwal) beta schedule, float64."""
    if schedule == "linear":
        scale = 1000.0 / timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
    if schedule == "cosine":
        s = 0.008
        x = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64)
        ac = torch.cos(((x / timesteps) + s) / (1 + s) * math.pi / 2) ** 2
        ac = ac / ac[0]
        return (1 - ac[1:] / ac[:-1]).clamp(0, 0.999)
    raise ValueError(f"unknown schedule {schedule!r}; use 'linear' or 'cosine'")


def _take(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] shaped to broadcast over a (B, C, H, W) batch."""
    return values.to(like.device)[t.to(like.device)].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


@dataclass
class Diffusion:
    """Schedule constants plus the maths that uses them. `prediction` is 'eps' or 'v'."""

    schedule: str = "cosine"
    timesteps: int = 1000
    prediction: str = "v"
    betas: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        if self.prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', not {self.prediction!r}")
        self.betas = make_betas(self.schedule, self.timesteps)
        self.alphas = 1 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])

    def config(self) -> dict:
        return {"schedule": self.schedule, "timesteps": self.timesteps, "prediction": self.prediction}

    # -- forward process and training target ---------------------------------------------------
    def q_sample(self, x0, t, noise):
        """Closed form q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)."""
        ac = _take(self.alphas_cumprod, t, x0)
        return ac.sqrt() * x0 + (1 - ac).sqrt() * noise

    def target(self, x0, t, noise):
        if self.prediction == "eps":
            return noise
        ac = _take(self.alphas_cumprod, t, x0)
        return ac.sqrt() * noise - (1 - ac).sqrt() * x0

    def split(self, out, x_t, t, clip: bool = True):
        """Network output -> (x0 estimate, eps estimate)."""
        ac = _take(self.alphas_cumprod, t, x_t)
        a, s = ac.sqrt(), (1 - ac).sqrt()
        if self.prediction == "eps":
            x0 = (x_t - s * out) / a
        else:
            x0 = a * x_t - s * out
        if clip:
            x0 = x0.clamp(-1, 1)
        eps = (x_t - a * x0) / s
        return x0, eps

    def loss(self, model: nn.Module, x0, cond, generator: torch.Generator | None = None,
             weight: torch.Tensor | None = None):
        """Simple MSE loss on the eps or v target at uniformly drawn steps. `weight` (N,1,H,W):
        per-pixel weights, the loss normalised by their sum (so all-ones is the plain MSE)."""
        b = x0.shape[0]
        t = torch.randint(0, self.timesteps, (b,), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        out = model(self.q_sample(x0, t, noise), t, cond)
        err = (out.float() - self.target(x0, t, noise).float()) ** 2
        if weight is None:
            return err.mean()
        w = weight.to(err.device, torch.float32).expand_as(err)
        return (err * w).sum() / w.sum()

    # -- sampling ----------------------------------------------------------------------------
    def start(self, shape, init, strength: float, generator, device):
        """x_T from pure noise (strength 1 or no init) or the init image noised to `strength`."""
        t_start = self.timesteps - 1 if init is None else max(0, min(self.timesteps - 1, round(strength * self.timesteps) - 1))
        noise = torch.randn(shape, generator=generator).to(device)
        if init is None or t_start == self.timesteps - 1 and strength >= 1.0:
            return noise, self.timesteps - 1
        t = torch.full((shape[0],), t_start, dtype=torch.long, device=device)
        return self.q_sample(init.to(device), t, noise), t_start

    @torch.no_grad()
    def sample(self, model: Callable, cond, *, sampler: str = "ddim", steps: int = 10, init=None,
               strength: float = 1.0, seed: int = 0, generator: torch.Generator | None = None):
        """Draw x_0 given `cond`; `steps` is the number of network evaluations.

        `ddpm` ignores `steps` and walks every step from the start level to 0.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
        gen = generator or torch.Generator().manual_seed(seed)
        shape = (cond.shape[0], 3, *cond.shape[2:])
        x, t_start = self.start(shape, init, strength, gen, cond.device)
        if sampler == "ddpm":
            return self._ddpm(model, cond, x, t_start, gen)
        ts = self.timesteps_for(t_start, steps)
        return (self._ddim if sampler == "ddim" else self._dpmpp2m)(model, cond, x, ts)

    @staticmethod
    def timesteps_for(t_start: int, steps: int) -> list[int]:
        """`steps` evenly spaced levels from t_start down (the last jump goes to x_0)."""
        steps = max(1, min(int(steps), t_start + 1))
        levels = [round((t_start + 1) * (steps - i) / steps) - 1 for i in range(steps)]
        return sorted(set(levels), reverse=True)

    def _eval(self, model, x, t: int, cond):
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        return self.split(model(x, tt, cond).to(x.dtype), x, tt)

    def _ddpm(self, model, cond, x, t_start, gen):
        for t in range(t_start, -1, -1):
            x0, _ = self._eval(model, x, t, cond)
            ac, acp, beta = (float(v[t]) for v in (self.alphas_cumprod, self.alphas_cumprod_prev, self.betas))
            mean = (beta * math.sqrt(acp) / (1 - ac)) * x0 + ((1 - acp) * math.sqrt(1 - beta) / (1 - ac)) * x
            if t > 0:
                var = beta * (1 - acp) / (1 - ac)
                x = mean + math.sqrt(var) * torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
            else:
                x = mean
        return x

    def _abar(self, t: int) -> float:
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def _ddim(self, model, cond, x, ts):
        for i, t in enumerate(ts):
            x0, eps = self._eval(model, x, t, cond)
            prev = self._abar(ts[i + 1] if i + 1 < len(ts) else -1)
            x = math.sqrt(prev) * x0 + math.sqrt(1 - prev) * eps
        return x

    def _dpmpp2m(self, model, cond, x, ts):
        """DPM-Solver++(2M), data prediction (Lu et al. 2022), first order on the last step."""
        lam = lambda t: 0.5 * math.log(self._abar(t) / (1 - self._abar(t)))  # noqa: E731
        old_x0, h_last = None, None
        for i, t in enumerate(ts):
            x0, _ = self._eval(model, x, t, cond)
            nxt = ts[i + 1] if i + 1 < len(ts) else -1
            if nxt < 0:
                return x0
            a_n, s_n, s_t = math.sqrt(self._abar(nxt)), math.sqrt(1 - self._abar(nxt)), math.sqrt(1 - self._abar(t))
            h = lam(nxt) - lam(t)
            d = x0
            if old_x0 is not None and h_last is not None:
                r = h_last / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old_x0
            x = (s_n / s_t) * x - a_n * math.expm1(-h) * d
            old_x0, h_last = x0, h
        return x

    def sample_k(self, model, cond, k: int = 1, seed: int = 0, init=None, **kw):
        """K samples per condition in one batch -> (mean, per-pixel SD over the K; None if K=1)."""
        b = cond.shape[0]
        rep = lambda z: None if z is None else z.repeat(k, *([1] * (z.ndim - 1)))  # noqa: E731
        xs = self.sample(model, rep(cond), init=rep(init), seed=seed, **kw).view(k, b, 3, *cond.shape[2:])
        return xs.mean(0), (xs.std(0, unbiased=False) if k > 1 else None)
