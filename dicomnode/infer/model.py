"""Model directories: a JSON model card plus safetensors weights, verified before use.

Layout of a model directory::

    model.json            the card (format, version, architecture, sha256 per file, training, metrics)
    pix2pix.safetensors   the Pix2Pix generator (eval-mode weights, fp16 storage)
    cddpm.safetensors     the EMA weights of the diffusion denoiser (fp16 storage)

`load_model` refuses a directory whose files are missing, whose checksums differ from the card,
whose architecture differs from the named preset, or whose tensors do not fit the network: each
error names the offending file, so an operator can tell a bad copy from a wrong model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dicomnode import __version__
from dicomnode.infer.diffusion import Diffusion
from dicomnode.infer.nets import CDDPM_PRESETS, PIX2PIX_PRESETS, DiffusionUNet, UnetGenerator, channels_last
from dicomnode.infer.presentation import OutputSpec, finish_fusion

CARD = "model.json"
FORMAT = "dicomnode-model/1"
FILES = {"pix2pix": "pix2pix.safetensors", "cddpm": "cddpm.safetensors"}
DEFAULT_SAMPLER = {"sampler": "ddim", "steps": 8, "strength": 0.5, "samples": 1}


from dicomnode.modelpath import ModelError  # noqa: E402,F401 (defined without torch, raised here too)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _arch(table: dict, preset: str, config: dict | None) -> dict:
    cfg = dict(table[preset]) if preset in table else {}
    cfg.update(config or {})
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def _save_weights(net: nn.Module, path: Path, fp16: bool):
    state = {k: (v.half() if fp16 and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in net.state_dict().items()}
    save_file(state, str(path))


def save_model(out_dir: str | Path, generator: UnetGenerator, denoiser: DiffusionUNet, *,
               pix2pix_preset: str, cddpm_preset: str, diffusion: Diffusion,
               pix2pix_config: dict | None = None, cddpm_config: dict | None = None,
               sampler: dict | None = None, training: dict | None = None, name: str = "t2fs2petfusion",
               version: str | None = None, fp16: bool = True) -> dict:
    """Write weights and card; returns the card. Metrics are added later by the evaluation."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _save_weights(generator, out / FILES["pix2pix"], fp16)
    _save_weights(denoiser, out / FILES["cddpm"], fp16)
    card = {
        "format": FORMAT,
        "name": name,
        "version": version or f"{name}-{datetime.now(timezone.utc):%Y%m%d}",
        "dicomnode_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "task": "sagittal T2FS spine MR slice (1x256x256 in [-1,1]) -> FDG PET/T2FS fusion RGB (3x256x256 in [-1,1])",
        "architecture": {
            "pix2pix": {"preset": pix2pix_preset, "config": _arch(PIX2PIX_PRESETS, pix2pix_preset, pix2pix_config)},
            "cddpm": {"preset": cddpm_preset, "config": _arch(CDDPM_PRESETS, cddpm_preset, cddpm_config),
                      "diffusion": diffusion.config()},
        },
        "storage": "float16" if fp16 else "float32",
        "sampler": dict(DEFAULT_SAMPLER, **(sampler or {})),
        "files": {f: sha256_file(out / f) for f in FILES.values()},
        "training": training or {},
        "metrics": {},
    }
    write_card(out, card)
    return card


def write_card(model_dir: str | Path, card: dict):
    (Path(model_dir) / CARD).write_text(json.dumps(card, indent=2) + "\n")


def read_card(model_dir: str | Path) -> dict:
    path = Path(model_dir) / CARD
    if not path.is_file():
        raise ModelError(f"model card missing: {path}")
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"model card unreadable: {path}: {e}") from e
    if card.get("format") != FORMAT:
        raise ModelError(f"{path}: format {card.get('format')!r} is not {FORMAT!r}")
    for key in ("version", "architecture", "files"):
        if key not in card:
            raise ModelError(f"{path}: no {key!r} field")
    return card


def _check_arch(card_path: Path, part: str, spec: dict, table: dict) -> dict:
    preset, cfg = spec.get("preset"), spec.get("config")
    if not isinstance(preset, str) or preset not in table:
        raise ModelError(f"{card_path}: {part} preset {preset!r} is unknown to dicomnode {__version__} "
                         f"(known: {sorted(table)})")
    if cfg != _arch(table, preset, None):
        raise ModelError(f"{card_path}: {part} architecture does not match preset {preset!r}: "
                         f"card {cfg} vs code {_arch(table, preset, None)}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}


def _load_weights(net: nn.Module, path: Path, expected_sha: str | None, verify: bool) -> nn.Module:
    if not path.is_file():
        raise ModelError(f"weights file missing: {path}")
    if verify:
        if not expected_sha:
            raise ModelError(f"{path.name} is not listed in the model card's files")
        got = sha256_file(path)
        if got != expected_sha:
            raise ModelError(f"checksum mismatch for {path}: sha256 {got} but the card says {expected_sha}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(f"weights file corrupt: {path}: {e}") from e
    ref = net.state_dict()
    state = {k: v.to(ref[k].dtype) if k in ref else v for k, v in state.items()}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelError(f"weights in {path} do not fit the card's architecture: {str(e)[:500]}") from e
    return net


@dataclass
class Translation:
    """Result of `FusionModel.translate`: all tensors (B, 3, 256, 256) on the model grid."""

    rgb: torch.Tensor            # final fusion in [-1, 1] (finished per the card's `output`, if any)
    pix2pix: torch.Tensor        # the raw Pix2Pix output in [-1, 1]
    sd: torch.Tensor | None      # per-pixel SD over K samples (uncertainty), None when K = 1


class FusionModel:
    """Loaded Pix2Pix + cDDPM pair: MR slices on the model grid -> fusion RGB on the model grid."""

    def __init__(self, generator: UnetGenerator, denoiser: DiffusionUNet, diffusion: Diffusion,
                 card: dict, device: torch.device, output: OutputSpec | None = None):
        self.generator, self.denoiser, self.diffusion = generator, denoiser, diffusion
        self.card, self.device, self.output = card, device, output
        self.defaults = dict(DEFAULT_SAMPLER, **card.get("sampler", {}))

    @property
    def version(self) -> str:
        return self.card["version"]

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, torch.float32).contiguous(memory_format=torch.channels_last)

    def pix2pix(self, mr: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.generator(self._prep(mr)).float().clamp(-1, 1)

    def translate(self, mr: torch.Tensor, *, refine: bool = True, sampler: str | None = None,
                  steps: int | None = None, strength: float | None = None, seed: int = 0,
                  samples: int | None = None, finish: bool = True) -> Translation:
        """mr: (B, 1, 256, 256) in [-1, 1]. Pix2Pix, then (if `refine`) the cDDPM warm-started
        from the Pix2Pix output noised to `strength` (1.0 = from pure noise); `samples` > 1 gives
        the mean of K samples and their per-pixel SD. With `finish` and a card `output` block, the
        result is finished as a fusion of this MR (dicomnode.infer.presentation)."""
        if mr.ndim != 4 or mr.shape[1] != 1:
            raise ValueError(f"expected MR of shape (B, 1, H, W), got {tuple(mr.shape)}")
        opts = {k: v if v is not None else self.defaults[k]
                for k, v in dict(sampler=sampler, steps=steps, strength=strength, samples=samples).items()}
        with torch.inference_mode():
            mr = self._prep(mr)
            p2p = self.generator(mr).float().clamp(-1, 1)
            done = (lambda x: finish_fusion(x, mr, self.output)) if finish and self.output else (lambda x: x)
            if not refine:
                return Translation(done(p2p), p2p, None)
            cond = torch.cat([mr, p2p], 1).contiguous(memory_format=torch.channels_last)
            init = None if float(opts["strength"]) >= 1.0 else p2p
            mean, sd = self.diffusion.sample_k(self.denoiser, cond, k=int(opts["samples"]), seed=seed, init=init,
                                               sampler=opts["sampler"], steps=int(opts["steps"]),
                                               strength=float(opts["strength"]))
            return Translation(done(mean.clamp(-1, 1)), p2p, sd)


def load_model(model_dir: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> FusionModel:
    """Read the card, verify files and architecture, and return a ready (eval-mode) FusionModel."""
    model_dir = Path(model_dir)
    card = read_card(model_dir)
    card_path = model_dir / CARD
    arch = card["architecture"]
    g_cfg = _check_arch(card_path, "pix2pix", arch.get("pix2pix", {}), PIX2PIX_PRESETS)
    d_cfg = _check_arch(card_path, "cddpm", arch.get("cddpm", {}), CDDPM_PRESETS)
    try:
        diffusion = Diffusion(**arch["cddpm"]["diffusion"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"{card_path}: bad cddpm diffusion settings: {e}") from e
    files = card["files"]
    generator = UnetGenerator(num_downs=g_cfg["num_downs"], ngf=g_cfg["ngf"], dropout=g_cfg["dropout"])
    denoiser = DiffusionUNet(**d_cfg)
    _load_weights(generator, model_dir / FILES["pix2pix"], files.get(FILES["pix2pix"]), verify)
    _load_weights(denoiser, model_dir / FILES["cddpm"], files.get(FILES["cddpm"]), verify)
    try:
        output = OutputSpec.from_card(card["output"]) if card.get("output") is not None else None
    except (TypeError, ValueError) as e:
        raise ModelError(f"{card_path}: bad output block: {e}") from e
    device = torch.device(device)
    for net in (generator, denoiser):
        channels_last(net, device).eval().requires_grad_(False)
    return FusionModel(generator, denoiser, diffusion, card, device, output)
