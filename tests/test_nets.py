"""Shapes and basic behaviour of every network preset."""

import pytest
import torch

from dicomnode.infer.nets import (
    CDDPM_PRESETS,
    PIX2PIX_PRESETS,
    build_denoiser,
    build_discriminator,
    build_generator,
    count_params,
)


@pytest.mark.parametrize("preset", sorted(PIX2PIX_PRESETS))
def test_generator_and_patchgan_shapes(preset):
    torch.manual_seed(0)
    g, d = build_generator(preset).eval(), build_discriminator(preset)
    mr = torch.rand(1, 1, 256, 256) * 2 - 1
    with torch.no_grad():
        out = g(mr)
        score = d(mr, out)
    assert out.shape == (1, 3, 256, 256)
    assert out.abs().max() <= 1.0  # tanh output
    assert score.shape == (1, 1, 30, 30)  # 70x70 PatchGAN on a 256 image


def test_unet_256_is_the_reference_generator():
    g = build_generator("unet_256")
    assert 54_000_000 < count_params(g) < 55_000_000  # reference unet_256 with ngf 64 (54.4M)
    assert sum(isinstance(m, torch.nn.Dropout) for m in g.modules()) == 3
    assert sum(isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2) for m in g.modules()) == 8


def test_small_generator_runs_in_train_mode_batch2():
    g = build_generator("small").train()
    out = g(torch.zeros(2, 1, 256, 256))
    out.mean().backward()
    assert out.shape == (2, 3, 256, 256)


@pytest.mark.parametrize("preset", sorted(CDDPM_PRESETS))
def test_denoiser_shapes(preset):
    net = build_denoiser(preset).eval()
    size = 256 if preset != "base" else 64
    x, cond = torch.randn(1, 3, size, size), torch.randn(1, 4, size, size)
    with torch.no_grad():
        out = net(x, torch.tensor([500]), cond)
    assert out.shape == (1, 3, size, size)


def test_denoiser_is_fully_convolutional_and_uses_time():
    net = build_denoiser("tiny").eval()
    torch.manual_seed(0)
    for p in net.parameters():  # zero-initialised output convs would hide the time path
        p.data.normal_(0, 0.2)
    x, cond = torch.randn(1, 3, 64, 96), torch.randn(1, 4, 64, 96)
    with torch.no_grad():
        a = net(x, torch.tensor([1]), cond)
        b = net(x, torch.tensor([900]), cond)
    assert a.shape == (1, 3, 64, 96)
    assert not torch.allclose(a, b)


def test_small_presets_fit_the_cpu_budget():
    """The shipped pair must stay small: < 20 MB in fp16 storage."""
    n = count_params(build_generator("small")) + count_params(build_denoiser("small"))
    assert n * 2 < 20e6
