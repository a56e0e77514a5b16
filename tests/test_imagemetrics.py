"""The paper's metrics against scikit-image reference implementations."""

import numpy as np
import pytest
import torch
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

from dicomnode.tools import imagemetrics as im


def _pair(seed=0, shape=(40, 48, 3)):
    rng = np.random.default_rng(seed)
    real = rng.random(shape)
    fake = np.clip(real + rng.normal(0, 0.08, shape), 0, 1)
    return real, fake


def _chw(x):
    return np.moveaxis(x, -1, 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_scikit_image(seed):
    real, fake = _pair(seed)
    ref_ssim = structural_similarity(real, fake, data_range=1.0, channel_axis=-1, gaussian_weights=True,
                                     sigma=1.5, use_sample_covariance=False)
    assert im.ssim(_chw(real), _chw(fake)) == pytest.approx(ref_ssim, abs=1e-9)
    assert im.psnr(_chw(real), _chw(fake)) == pytest.approx(peak_signal_noise_ratio(real, fake, data_range=1.0), abs=1e-9)
    assert im.mse(_chw(real), _chw(fake)) == pytest.approx(mean_squared_error(real, fake), abs=1e-12)
    assert im.mae(_chw(real), _chw(fake)) == pytest.approx(np.abs(real - fake).mean(), abs=1e-12)


def test_grayscale_and_batches_and_torch():
    real, fake = _pair(3, (32, 32, 3))
    ref = structural_similarity(real[..., 0], fake[..., 0], data_range=1.0, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False)
    assert im.ssim(real[..., 0], fake[..., 0]) == pytest.approx(ref, abs=1e-9)
    batch_r = torch.from_numpy(np.stack([_chw(real), _chw(fake)])).float()
    batch_f = torch.from_numpy(np.stack([_chw(fake), _chw(fake)])).float()
    vals = im.all_metrics(batch_r, batch_f)
    assert vals["ssim"].shape == (2,) and vals["ssim"][1] == pytest.approx(1.0)
    assert vals["ssim"][0] == pytest.approx(im.ssim(_chw(real), _chw(fake)), abs=1e-5)
    assert np.isinf(vals["psnr"][1]) and vals["mse"][1] == 0


def test_uint8_input_is_scaled():
    rng = np.random.default_rng(4)
    a = rng.integers(0, 256, (3, 24, 24), dtype=np.uint8)
    b = rng.integers(0, 256, (3, 24, 24), dtype=np.uint8)
    assert im.mae(a, b) == pytest.approx(np.abs(a / 255.0 - b / 255.0).mean())
    with pytest.raises(ValueError):
        im.mse(a, b[:, :20])
