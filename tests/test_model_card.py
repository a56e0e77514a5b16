"""Model directory: save/load round trip, checksum and architecture verification."""

import json

import pytest
import torch

from dicomnode.infer.diffusion import Diffusion
from dicomnode.infer.model import CARD, FILES, ModelError, load_model, read_card, save_model, write_card
from dicomnode.infer.nets import build_denoiser, build_generator


@pytest.fixture()
def model_dir(tmp_path):
    torch.manual_seed(0)
    g, d = build_generator("tiny").eval(), build_denoiser("tiny").eval()
    for p in d.parameters():
        p.data.normal_(0, 0.05)
    save_model(tmp_path / "m", g, d, pix2pix_preset="tiny", cddpm_preset="tiny", diffusion=Diffusion("cosine", 100, "v"),
               sampler={"steps": 3, "strength": 0.4}, training={"steps": 1})
    return tmp_path / "m", g, d


def test_round_trip(model_dir):
    path, g, d = model_dir
    card = read_card(path)
    assert card["architecture"]["pix2pix"]["preset"] == "tiny" and card["version"].startswith("t2fs2petfusion-")
    assert set(card["files"]) == set(FILES.values()) and all(len(h) == 64 for h in card["files"].values())
    model = load_model(path)
    mr = torch.rand(2, 1, 64, 64) * 2 - 1
    with torch.no_grad():
        ref = g(mr)
    assert torch.allclose(model.pix2pix(mr), ref.clamp(-1, 1), atol=2e-2)  # fp16 storage
    out = model.translate(mr, seed=3, samples=2)
    assert out.rgb.shape == out.pix2pix.shape == out.sd.shape == (2, 3, 64, 64)
    assert out.rgb.abs().max() <= 1
    again = model.translate(mr, seed=3, samples=2)
    assert torch.equal(out.rgb, again.rgb)
    assert model.translate(mr, refine=False).sd is None
    for name, net in (("pix2pix", g), ("cddpm", d)):
        loaded = (model.generator if name == "pix2pix" else model.denoiser).state_dict()
        for k, v in net.state_dict().items():
            assert torch.allclose(loaded[k].float(), v.float().half().float())


def test_rejects_corrupt_weights(model_dir):
    path = model_dir[0]
    f = path / FILES["cddpm"]
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="checksum mismatch.*cddpm.safetensors"):
        load_model(path)
    # even with verification off, garbage is refused with the file named
    f.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="cddpm.safetensors"):
        load_model(path, verify=False)


def test_rejects_missing_file(model_dir):
    path = model_dir[0]
    (path / FILES["pix2pix"]).unlink()
    with pytest.raises(ModelError, match="missing.*pix2pix.safetensors"):
        load_model(path)
    (path / CARD).unlink()
    with pytest.raises(ModelError, match="model card missing"):
        load_model(path)


def test_rejects_architecture_mismatch(model_dir):
    path = model_dir[0]
    card = json.loads((path / CARD).read_text())
    card["architecture"]["cddpm"]["config"]["dim"] = 16
    write_card(path, card)
    with pytest.raises(ModelError, match="cddpm architecture does not match"):
        load_model(path)
    card["architecture"]["cddpm"]["config"]["dim"] = 8
    card["architecture"]["pix2pix"]["preset"] = "small"  # tiny weights, small preset
    card["architecture"]["pix2pix"]["config"] = read_card(path)["architecture"]["pix2pix"]["config"] | {
        "num_downs": 8, "ngf": 16, "ndf": 32}
    write_card(path, card)
    with pytest.raises(ModelError, match="pix2pix.safetensors.*do not fit"):
        load_model(path)


SHIPPED = __import__("pathlib").Path(__file__).resolve().parents[1] / "models" / "t2fs2petfusion"


@pytest.mark.skipif(not SHIPPED.is_dir(), reason="no shipped model in models/")
def test_shipped_model_verifies_and_runs():
    total = sum(f.stat().st_size for f in SHIPPED.iterdir())
    assert total <= 40e6
    card = read_card(SHIPPED)
    assert card["architecture"]["pix2pix"]["preset"] == "small" and card["architecture"]["cddpm"]["preset"] == "small"
    assert card["training"]["commands"]
    model = load_model(SHIPPED)  # checksums + architecture
    assert model.defaults["steps"] * model.defaults["samples"] <= 10  # the CPU budget: <= 10 denoiser evaluations
    out = model.translate(torch.zeros(1, 1, 256, 256) - 1, seed=0)
    assert out.rgb.shape == (1, 3, 256, 256) and torch.isfinite(out.rgb).all()
