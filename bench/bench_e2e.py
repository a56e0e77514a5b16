"""End-to-end latency of the node with the synthesiser (not a test; see docs/benchmarks.md).

Latency: a phantom series (default 15 slices, 320x320) is sent with the node's SCU to a node on
loopback (the model in its inference process) that forwards to a local storage SCP; we report
last instance received by the node -> last result acknowledged by the sink, and the job's stage
timings. Arithmetic: model GFLOP per slice (torch FlopCounterMode) over the measured inference
time, against a plain fp32 channels-last 3x3 convolution measured on the same machine before and
after the series (the ratio uses the faster of the two). Memory: bench/bench_memory.py.

    python bench/bench_e2e.py [--model default] [--device cpu] [--slices 15 --rows 320]

With no trained model available, `--model stand-in` (also the fallback) uses random weights in the
shipped architecture: the timings are representative, the pictures are not.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicomnode.config import InferenceConfig  # noqa: E402
from dicomnode.engine import Synthesis  # noqa: E402
from dicomnode.infer.model import ModelError  # noqa: E402
from dicomnode.synthesize import load_synthesizer  # noqa: E402
from dicomnode.tools.demo import run_case  # noqa: E402
from dicomnode.tools.phantom import write_case  # noqa: E402


def stand_in_model(path: Path) -> Path:
    """Random weights, shipped presets (pix2pix small + cddpm small), as models/t2fs2petfusion would be."""
    from dicomnode.infer.diffusion import Diffusion
    from dicomnode.infer.model import save_model
    from dicomnode.infer.nets import build_denoiser, build_generator

    torch.manual_seed(0)
    save_model(path, build_generator("small").eval(), build_denoiser("small").eval(), pix2pix_preset="small",
               cddpm_preset="small", diffusion=Diffusion("cosine", 1000, "v"), name="standin", version="random-weights")
    return path


def model_gflop_per_slice(synth) -> float:
    """FLOPs (2 per MAC) of one slice through Pix2Pix plus steps x samples denoiser evaluations."""
    m, s = synth.model, synth.settings
    mr = torch.zeros(1, 1, 256, 256, device=synth.device)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        m.generator(mr)
    g = fc.get_total_flops()
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        m.denoiser(torch.zeros(1, 3, 256, 256, device=synth.device), torch.zeros(1, dtype=torch.long,
                   device=synth.device), torch.zeros(1, 4, 256, 256, device=synth.device))
    evals = (s.steps if s.sampler != "ddpm" else round(s.strength * m.diffusion.timesteps)) * s.samples
    return (g + evals * fc.get_total_flops()) / 1e9


def conv_gflops(device: torch.device, seconds: float = 3.0) -> float:
    """Reference: fp32 channels-last 3x3 conv, 64->64 channels, 4x64x128x128."""
    x = torch.randn(4, 64, 128, 128, device=device).contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(device, memory_format=torch.channels_last).eval()
    flop = 2 * 4 * 64 * 64 * 9 * 128 * 128
    with torch.inference_mode():
        conv(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            conv(x)
            n += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        return n * flop / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--slices", type=int, default=15)
    ap.add_argument("--rows", type=int, default=320)
    ap.add_argument("--out", type=Path, default=None, help="Write the results as JSON here.")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_e2e_"))
    try:
        if args.model == "stand-in":
            raise ModelError("stand-in requested")
        model = args.model
        synth = load_synthesizer(InferenceConfig(model=model, device=args.device))  # here only to count FLOPs
        which = f"trained model {synth.name}"
    except ModelError as exc:
        print(f"no trained model ({exc}); using random weights in the shipped architecture", file=sys.stderr)
        model = str(stand_in_model(work / "standin"))
        synth = load_synthesizer(InferenceConfig(model=model, device=args.device))
        which = "stand-in: random weights, shipped architecture (pix2pix small + cddpm small)"
    inference = {"model": model, "device": args.device}
    processor = Synthesis(InferenceConfig(**inference))
    results = {"model": which, "device": str(synth.device), "torch_threads": torch.get_num_threads(),
               "settings": synth.settings.__dict__}
    conv_before = conv_gflops(synth.device)  # the reference before and after, as the machine's load drifts
    case = write_case(work / "case", 3, rows=args.rows, cols=args.rows, slices=args.slices, lesion=True)
    t0 = time.perf_counter()
    res = run_case(work / "latency", processor, case, inference, previews=False)
    assert res.job_state == "done" and len(res.received) == args.slices, (res.job_state, res.job_error)
    results["latency"] = {"slices": args.slices, "matrix": f"{args.rows}x{args.rows}", "latency_s": round(res.latency, 2),
                          "wall_s": round(time.perf_counter() - t0, 2), "stages_s": res.timings}
    gflop = model_gflop_per_slice(synth)
    infer_s = results["latency"]["stages_s"]["infer"]
    results["gflop_per_slice"] = round(gflop, 1)
    results["model_gflops"] = round(gflop * args.slices / infer_s, 1)
    conv = (conv_before, conv_gflops(synth.device))
    results["conv_reference_gflops"] = [round(c, 1) for c in conv]
    # judged against the faster of the two reference measurements (the conservative ratio)
    results["fraction_of_reference"] = round(results["model_gflops"] / max(conv), 2)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
