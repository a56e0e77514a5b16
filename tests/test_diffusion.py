"""Schedule maths, parameterisations and samplers of the cDDPM."""

import math

import pytest
import torch

from dicomnode.infer.diffusion import SAMPLERS, Diffusion, make_betas
from dicomnode.infer.nets import build_denoiser
from training.trainutil import EMA


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_closed_form_matches_iterative_chain(schedule):
    d = Diffusion(schedule, 1000)
    # exact recursion of the mean coefficient and variance of x_t | x_0
    coef, var = 1.0, 0.0
    for t in range(1000):
        beta = float(d.betas[t])
        coef, var = coef * math.sqrt(1 - beta), (1 - beta) * var + beta
        if t in (0, 10, 250, 999):
            assert coef == pytest.approx(math.sqrt(float(d.alphas_cumprod[t])), rel=1e-9, abs=1e-12)
            assert var == pytest.approx(1 - float(d.alphas_cumprod[t]), rel=1e-9)
    # Monte Carlo: run the one-step chain and compare moments with q_sample at t = 300
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1, 1, 1), 0.7, dtype=torch.float64)
    x = x0.clone()
    for t in range(301):
        beta = d.betas[t]
        x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn(x.shape, generator=g, dtype=torch.float64)
    closed = d.q_sample(x0, torch.full((20000,), 300), torch.randn(x0.shape, generator=g, dtype=torch.float64))
    assert x.mean().item() == pytest.approx(closed.mean().item(), abs=0.03)
    assert x.std().item() == pytest.approx(closed.std().item(), rel=0.03)


def test_schedules():
    lin = make_betas("linear", 1000)
    assert lin[0].item() == pytest.approx(1e-4) and lin[-1].item() == pytest.approx(0.02)
    cos = make_betas("cosine", 1000)
    assert (cos > 0).all() and (cos <= 0.999).all()
    ac = torch.cumprod(1 - cos, 0)
    assert ac[0] > 0.9999 and ac[-1] < 1e-4
    with pytest.raises(ValueError):
        make_betas("quadratic")


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_target_and_split_are_inverse(prediction):
    d = Diffusion("cosine", 1000, prediction)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 3, 8, 8, generator=g) * 1.6 - 0.8
    noise = torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 990])
    xt = d.q_sample(x0, t, noise)
    x0_hat, eps_hat = d.split(d.target(x0, t, noise), xt, t, clip=False)
    assert torch.allclose(x0_hat, x0, atol=1e-4)
    assert torch.allclose(eps_hat, noise, atol=1e-3)


def _oracle(d: Diffusion, x0):
    """A denoiser that knows x_0: it returns the exact target, so every sampler must land on x_0."""
    def model(x, t, cond):
        ac = d.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        eps = (x - ac.sqrt() * x0) / (1 - ac).sqrt()
        return eps if d.prediction == "eps" else ac.sqrt() * eps - (1 - ac).sqrt() * x0
    return model


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_samplers_recover_x0_with_an_oracle(sampler, prediction):
    d = Diffusion("cosine", 200, prediction)
    x0 = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 1.8 - 0.9
    cond = torch.zeros(2, 4, 8, 8)
    out = d.sample(_oracle(d, x0), cond, sampler=sampler, steps=4, seed=5)
    assert torch.allclose(out, x0, atol=1e-3)
    warm = d.sample(_oracle(d, x0), cond, sampler=sampler, steps=3, init=torch.zeros_like(x0), strength=0.4)
    assert torch.allclose(warm, x0, atol=1e-3)


@pytest.mark.parametrize("sampler,steps", [("ddpm", 0), ("ddim", 100), ("dpmpp2m", 10), ("dpmpp2m", 20)])
def test_samplers_reproduce_a_gaussian_data_distribution(sampler, steps):
    """With the Bayes-optimal denoiser for x_0 ~ N(m, s^2) the samples must follow N(m, s^2)."""
    m, s = 0.2, 0.25
    d = Diffusion("linear", 1000, "eps")

    def model(x, t, cond):
        ac = d.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        x0 = m + s * s * ac.sqrt() * (x - ac.sqrt() * m) / (ac * s * s + 1 - ac)
        return (x - ac.sqrt() * x0) / (1 - ac).sqrt()

    out = d.sample(model, torch.zeros(4000, 4, 1, 1), sampler=sampler, steps=steps, seed=0)
    # the fast samplers end with the MMSE jump E[x_0 | x_t] from their last level t, whose spread
    # is s^2 sqrt(a) / sqrt(a s^2 + 1 - a) with a = abar_t; the full DDPM ends at t = 0 (spread ~ s)
    last = 0 if sampler == "ddpm" else d.timesteps_for(999, steps)[-1]
    a = float(d.alphas_cumprod[last])
    expected = s * s * math.sqrt(a) / math.sqrt(a * s * s + 1 - a)
    assert out.mean().item() == pytest.approx(m, abs=0.02)
    assert out.std().item() == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampler_determinism_per_seed(sampler):
    torch.manual_seed(0)
    net = build_denoiser("tiny").eval()
    for p in net.parameters():
        p.data.normal_(0, 0.05)
    d = Diffusion("cosine", 50, "v")
    cond = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(9))
    init = torch.zeros(1, 3, 32, 32)
    run = lambda seed: d.sample(net, cond, sampler=sampler, steps=4, init=init, strength=0.5, seed=seed)  # noqa: E731
    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_sample_k_mean_and_sd():
    d = Diffusion("cosine", 100, "v")
    net = lambda x, t, cond: torch.zeros_like(x)  # noqa: E731  predicts v=0: x0 follows x_t
    cond = torch.zeros(2, 4, 16, 16)
    mean, sd = d.sample_k(net, cond, k=4, seed=1, sampler="ddim", steps=3, init=torch.zeros(2, 3, 16, 16), strength=0.3)
    assert mean.shape == sd.shape == (2, 3, 16, 16)
    assert (sd > 0).float().mean() > 0.9  # different noise per sample -> spread
    m1, sd1 = d.sample_k(net, cond, k=1, seed=1, sampler="ddim", steps=3)
    assert sd1 is None and m1.shape == (2, 3, 16, 16)


def test_timesteps_for_counts_network_evaluations():
    for start, steps in [(999, 10), (499, 4), (999, 1), (5, 10)]:
        ts = Diffusion.timesteps_for(start, steps)
        assert len(ts) == min(steps, start + 1) and ts[0] == start and ts == sorted(ts, reverse=True)


def test_ema_tracks_weights():
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, decay=0.9)
    with torch.no_grad():
        net.weight.add_(1.0)
    before = ema.model.weight.clone()
    for _ in range(200):
        ema.update(net)
    assert torch.allclose(ema.model.weight, net.weight, atol=1e-4)
    assert not torch.allclose(before, net.weight)
