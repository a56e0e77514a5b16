"""CPU training throughput: images per second of a real training step, against the same network's
plain forward + backward in the same process (not a test; see docs/benchmarks.md).

For each network (Pix2Pix generator + PatchGAN with LSGAN + L1, as `training.pix2pix`; cDDPM
denoiser with the diffusion loss on 128x128 crops, as `training.cddpm`) and each variant:

- layout: contiguous (NCHW) or channels-last tensors and weights;
- precision: fp32, or bf16 autocast (only where the CPU has native bf16: AVX-512 BF16 / AMX);
- threads: torch intra-op threads (1, 2);
- --compile: also torch.compile'd (slow to compile on a CPU; off by default).

    python bench/bench_train.py [--presets small] [--threads 1 2] [--steps 6] [--compile] [--out r.json]

The ratio step/plain says how much the training loop costs beyond the network itself (the
discriminator, the optimiser, the loss); it is measured side by side, so machine load cancels.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicomnode.infer.diffusion import Diffusion  # noqa: E402
from dicomnode.infer.nets import build_denoiser, build_discriminator, build_generator  # noqa: E402

PIX2PIX_BATCH, CDDPM_BATCH, CROP = 4, 6, 128


def bf16_native() -> bool:
    from training.trainutil import cpu_bf16_native

    return cpu_bf16_native()


def timed(fn, steps: int, warmup: int = 2) -> float:
    """Seconds per call, after warm-up (median of `steps`)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def pix2pix_step_fns(preset: str, channels_last: bool, bf16: bool, compile_: bool):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    G, D = build_generator(preset).to(memory_format=fmt), build_discriminator(preset).to(memory_format=fmt)
    if compile_:
        G, D = torch.compile(G), torch.compile(D)
    opt_g = torch.optim.Adam(G.parameters(), 2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), 2e-4, betas=(0.5, 0.999))
    mr = torch.randn(PIX2PIX_BATCH, 1, 256, 256).contiguous(memory_format=fmt)
    real = torch.rand(PIX2PIX_BATCH, 3, 256, 256).mul(2).sub(1).contiguous(memory_format=fmt)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step():
        with amp:
            fake = G(mr)
            p_real, p_fake = D(mr, real), D(mr, fake.detach())
            loss_d = 0.5 * (F.mse_loss(p_real.float(), torch.ones_like(p_real, dtype=torch.float32))
                            + F.mse_loss(p_fake.float(), torch.zeros_like(p_fake, dtype=torch.float32)))
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        with amp:
            p_fake = D(mr, fake)
            loss_g = F.mse_loss(p_fake.float(), torch.ones_like(p_fake, dtype=torch.float32)) \
                + 100 * F.l1_loss(fake.float(), real.float())
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()

    def plain():
        with amp:
            out = G(mr)
        out.float().mean().backward()
        G.zero_grad(set_to_none=True)

    return step, plain, PIX2PIX_BATCH


def cddpm_step_fns(preset: str, channels_last: bool, bf16: bool, compile_: bool):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = build_denoiser(preset).to(memory_format=fmt)
    if compile_:
        net = torch.compile(net)
    diffusion = Diffusion("cosine", 1000, "v")
    opt = torch.optim.AdamW(net.parameters(), 2e-4)
    x0 = torch.rand(CDDPM_BATCH, 3, CROP, CROP).mul(2).sub(1).contiguous(memory_format=fmt)
    cond = torch.randn(CDDPM_BATCH, 4, CROP, CROP).contiguous(memory_format=fmt)
    t = torch.randint(0, 1000, (CDDPM_BATCH,))
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    gen = torch.Generator().manual_seed(0)

    def step():
        with amp:
            loss = diffusion.loss(net, x0, cond, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()

    def plain():
        with amp:
            out = net(torch.cat([x0], 1), t, cond)
        out.float().mean().backward()
        net.zero_grad(set_to_none=True)

    return step, plain, CDDPM_BATCH


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["small"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    precisions = [False, True] if bf16_native() else [False]
    for threads in args.threads:
        torch.set_num_threads(threads)
        for preset in args.presets:
            for name, make in (("pix2pix", pix2pix_step_fns), ("cddpm", cddpm_step_fns)):
                for channels_last in (False, True):
                    for bf16 in precisions:
                        for compile_ in ([False, True] if args.compile else [False]):
                            step, plain, batch = make(preset, channels_last, bf16, compile_)
                            s_step, s_plain = timed(step, args.steps), timed(plain, args.steps)
                            row = {"net": name, "preset": preset, "threads": threads,
                                   "layout": "channels_last" if channels_last else "nchw",
                                   "precision": "bf16" if bf16 else "fp32", "compiled": compile_,
                                   "step_images_per_s": round(batch / s_step, 2),
                                   "plain_images_per_s": round(batch / s_plain, 2),
                                   "step_over_plain": round(s_step / s_plain, 2)}
                            rows.append(row)
                            print(json.dumps(row), flush=True)
    result = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "bf16_native": bf16_native(),
              "torch": torch.__version__, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
