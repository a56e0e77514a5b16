"""Networks of the method (Jung et al., Spine J 2024): Pix2Pix U-Net generator, 70x70 PatchGAN,
and the conditional diffusion U-Net. Shared by training and inference so both build the same
modules from the same preset names.

Pix2Pix follows the reference implementation (Isola et al., junyanz/pytorch-CycleGAN-and-pix2pix):
`unet_256` is the paper-faithful generator; `small` and `tiny` keep its topology with fewer
filters so a CPU can afford it. The diffusion U-Net is a compact DDPM U-Net (Ho et al.;
lucidrains style) with an optional pixel-unshuffle stem, which quarters the cost of the
full-resolution level.
"""

from __future__ import annotations

import math
from typing import TypeVar, cast

import torch
import torch.nn.functional as F
from torch import nn

# -- presets ---------------------------------------------------------------------------------

PIX2PIX_PRESETS: dict[str, dict] = {
    "unet_256": dict(num_downs=8, ngf=64, ndf=64, dropout=True),   # paper / reference
    "small": dict(num_downs=8, ngf=16, ndf=32, dropout=False),     # shipped CPU model
    "tiny": dict(num_downs=5, ngf=4, ndf=4, dropout=False),        # tests
}

CDDPM_PRESETS: dict[str, dict] = {
    "base": dict(dim=64, mults=(1, 2, 4, 8), attn=(False, False, False, True), patch=1),
    "small": dict(dim=32, mults=(1, 2, 3, 4), attn=(False, False, False, True), patch=2),
    "tiny": dict(dim=8, mults=(1, 2, 2), attn=(False, False, True), patch=2),
}


def preset_config(table: dict[str, dict], name: str) -> dict:
    if name not in table:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(table)}")
    return dict(table[name])


def build_generator(preset: str = "small", **overrides) -> "UnetGenerator":
    cfg = preset_config(PIX2PIX_PRESETS, preset) | overrides
    return UnetGenerator(num_downs=cfg["num_downs"], ngf=cfg["ngf"], dropout=cfg["dropout"])


def build_discriminator(preset: str = "small", **overrides) -> "PatchDiscriminator":
    cfg = preset_config(PIX2PIX_PRESETS, preset) | overrides
    return PatchDiscriminator(ndf=cfg["ndf"])


def build_denoiser(preset: str = "small", **overrides) -> "DiffusionUNet":
    cfg = preset_config(CDDPM_PRESETS, preset) | overrides
    return DiffusionUNet(**cfg)


# -- Pix2Pix ---------------------------------------------------------------------------------

class UnetSkipBlock(nn.Module):
    """One level of the reference U-Net: down -> submodule -> up, concatenated with the input."""

    def __init__(self, outer: int, inner: int, in_ch: int | None = None, sub: nn.Module | None = None,
                 outermost: bool = False, innermost: bool = False, dropout: bool = False,
                 out_ch: int | None = None):
        super().__init__()
        self.outermost = outermost
        in_ch = in_ch or outer
        norm = nn.BatchNorm2d
        down = nn.Conv2d(in_ch, inner, 4, 2, 1, bias=False)
        layers: list[nn.Module]
        if innermost:
            up = nn.ConvTranspose2d(inner, outer, 4, 2, 1, bias=False)
            layers = [nn.LeakyReLU(0.2, True), down, nn.ReLU(True), up, norm(outer)]
        elif sub is None:
            raise ValueError("only the innermost block has no submodule")
        elif outermost:
            up = nn.ConvTranspose2d(inner * 2, out_ch or outer, 4, 2, 1)
            layers = [down, sub, nn.ReLU(True), up, nn.Tanh()]
        else:
            up = nn.ConvTranspose2d(inner * 2, outer, 4, 2, 1, bias=False)
            layers = [nn.LeakyReLU(0.2, True), down, norm(inner), sub, nn.ReLU(True), up, norm(outer)]
            if dropout:
                layers.append(nn.Dropout(0.5))
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x) if self.outermost else torch.cat([x, self.model(x)], 1)


class UnetGenerator(nn.Module):
    """Pix2Pix U-Net: `num_downs` stride-2 levels (8 takes 256x256 to 1x1), tanh output."""

    def __init__(self, in_ch: int = 1, out_ch: int = 3, num_downs: int = 8, ngf: int = 64,
                 dropout: bool = False):
        super().__init__()
        block = UnetSkipBlock(ngf * 8, ngf * 8, innermost=True)
        for _ in range(num_downs - 5):  # the reference puts dropout in these inner decoder blocks
            block = UnetSkipBlock(ngf * 8, ngf * 8, sub=block, dropout=dropout)
        for mult in (4, 2, 1):
            block = UnetSkipBlock(ngf * mult, ngf * mult * 2, sub=block)
        self.model = UnetSkipBlock(ngf, ngf, in_ch=in_ch, out_ch=out_ch, sub=block, outermost=True)

    def forward(self, mr):
        return self.model(mr)

    def encoder_features(self, mr: torch.Tensor, levels: int = 5) -> torch.Tensor:
        """(B, F): the per-channel mean and SD of the first `levels` contracting levels' activations
        (outermost first), the generator's own description of the slice it is shown (the input gate)."""
        pooled: list[torch.Tensor] = []
        block: UnetSkipBlock | None = self.model
        h = mr
        while block is not None and len(pooled) < 2 * levels:
            layers = block.model
            if block.outermost:  # [down, sub, ...]
                h, block = layers[0](h), cast(UnetSkipBlock, layers[1])
            elif isinstance(layers[3], UnetSkipBlock):  # [LeakyReLU, down, norm, sub, ...]
                h, block = layers[2](layers[1](F.leaky_relu(h, 0.2))), layers[3]
            else:  # innermost: [LeakyReLU, down, ...]
                h, block = layers[1](F.leaky_relu(h, 0.2)), None
            pooled += [h.mean((2, 3)), h.std((2, 3))]
        return torch.cat(pooled, 1)


class PatchDiscriminator(nn.Module):
    """70x70 PatchGAN (3 layers) on concat(MR, RGB): one real/fake score per receptive field."""

    def __init__(self, in_ch: int = 4, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_ch, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, mr, rgb):
        return self.model(torch.cat([mr, rgb], 1))


def init_weights(net: nn.Module, gain: float = 0.02) -> nn.Module:
    """Reference init: N(0, 0.02) convs, N(1, 0.02) batch-norm scales."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)
    return net


# -- conditional diffusion U-Net -------------------------------------------------------------

def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, ch), ch)


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of the (integer) diffusion step followed by an MLP."""

    def __init__(self, dim: int, out: int):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, out), nn.SiLU(), nn.Linear(out, out))

    def forward(self, t):
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / (half - 1))
        args = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([args.sin(), args.cos()], -1))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv x2 with a scale/shift from the time embedding."""

    def __init__(self, cin: int, cout: int, temb: int):
        super().__init__()
        self.block1 = nn.Sequential(_norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.time = nn.Sequential(nn.SiLU(), nn.Linear(temb, cout * 2))
        self.norm2 = _norm(cout)
        last = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(last.weight)  # each block starts as the identity (plus its skip)
        if last.bias is not None:
            nn.init.zeros_(last.bias)
        self.conv2 = nn.Sequential(nn.SiLU(), last)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.block1(x)
        scale, shift = self.time(temb)[:, :, None, None].chunk(2, 1)
        h = self.conv2(self.norm2(h) * (1 + scale) + shift)
        return h + self.skip(x)


class Attention(nn.Module):
    """Multi-head self-attention over pixels; used only at low resolution where it is cheap."""

    def __init__(self, ch: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm = _norm(ch)
        self.qkv = nn.Conv2d(ch, ch * 3, 1)
        self.out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        o = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(o.transpose(-1, -2).reshape(b, c, h, w))


class DiffusionUNet(nn.Module):
    """Denoiser eps/v(x_t, t | MR, Pix2Pix output); conditioning by channel concatenation.

    `patch` > 1 folds patch x patch pixels into channels first (pixel unshuffle) and unfolds at
    the end, so the widest level runs at 1/patch resolution.
    """

    def __init__(self, dim: int = 32, mults=(1, 2, 4, 4), attn=(False, False, False, True),
                 patch: int = 1, img_ch: int = 3, cond_ch: int = 4):
        super().__init__()
        self.patch = patch
        temb = dim * 4
        self.time = TimeEmbedding(dim, temb)
        chans = [dim * m for m in mults]
        self.stem = nn.Conv2d((img_ch + cond_ch) * patch * patch, dim, 3, padding=1)
        self.downs, self.ups = nn.ModuleList(), nn.ModuleList()
        prev = dim
        for i, (ch, use_attn) in enumerate(zip(chans, attn)):
            last = i == len(chans) - 1
            self.downs.append(nn.ModuleList([
                ResBlock(prev, ch, temb), Attention(ch) if use_attn else nn.Identity(),
                nn.Identity() if last else nn.Conv2d(ch, ch, 3, 2, 1)]))
            prev = ch
        self.mid1, self.mid_attn, self.mid2 = ResBlock(prev, prev, temb), Attention(prev), ResBlock(prev, prev, temb)
        for i, (ch, use_attn) in reversed(list(enumerate(zip(chans, attn)))):
            first = i == 0
            self.ups.append(nn.ModuleList([
                ResBlock(prev + ch, ch, temb), Attention(ch) if use_attn else nn.Identity(),
                nn.Identity() if first else nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                                          nn.Conv2d(ch, chans[i - 1], 3, padding=1))]))
            prev = ch if first else chans[i - 1]
        self.head = nn.Sequential(_norm(prev), nn.SiLU(), nn.Conv2d(prev, img_ch * patch * patch, 3, padding=1))
        self.divisor = patch * 2 ** (len(chans) - 1)

    def forward(self, x, t, cond):
        h = torch.cat([x, cond], 1)
        if self.patch > 1:
            h = F.pixel_unshuffle(h, self.patch)
        h, temb = self.stem(h), self.time(t)
        skips = []
        for res, att, down in cast("list[nn.ModuleList]", self.downs):
            h = att(res(h, temb))
            skips.append(h)
            h = down(h)
        h = self.mid2(self.mid_attn(self.mid1(h, temb)), temb)
        for res, att, up in cast("list[nn.ModuleList]", self.ups):
            h = up(att(res(torch.cat([h, skips.pop()], 1), temb)))
        h = self.head(h)
        return F.pixel_shuffle(h, self.patch) if self.patch > 1 else h


M = TypeVar("M", bound=nn.Module)


def channels_last(net: M, device: torch.device | str) -> M:
    """`net` on `device` with channels-last weights (faster convolutions on CPUs and GPUs)."""
    return net.to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]  # not in torch's stubs


def count_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())

