"""`python -m training <command> ...`: one module per command, each exposing main(argv) -> int.

Adding a command is one line in COMMANDS.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "retrieve": ("training.retrieve", "fetch T2FS and PT series from a PACS (C-FIND, C-GET) into an export folder"),
    "build-dataset": ("training.data", "pair an export into the de-identified paired data set (manifest, arrays, pairs.csv)"),
    "pix2pix": ("training.pix2pix", "train the Pix2Pix generator (LSGAN + L1, PatchGAN)"),
    "select": ("training.select", "choose a Pix2Pix snapshot on the validation split (PSNR, SSIM, hot uptake)"),
    "cddpm": ("training.cddpm", "train the cDDPM refiner and export the model directory"),
    "finish": ("training.finish", "choose the output's PET smoothing and black level on the validation split (card `output`)"),
    "calibrate-gate": ("training.calibrate", "calibrate a model folder's input gate and output check (card `gate`)"),
    "finetune": ("training.finetune", "fine-tune a model folder on a site's data set: generator, then cDDPM, then the card"),
    "evaluate": ("training.evaluate", "PSNR/SSIM/MAE/MSE, uptake tertiles, ablation, comparison figure"),
    "reader-study": ("training.reader.cli", "a blinded reader study of real against synthetic fusions, in the browser"),
    "compare": ("training.compare", "two or more models side by side, paired bootstrap 95 % intervals by patient"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m training <command> [options]\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<16} {text}")
        return 0 if argv[:1] in ([], ["-h"], ["--help"]) else 2
    from dicomnode.synthesize import DeviceError, pick_device

    try:
        device = _option(argv[1:], "--device")
        if device is not None:  # before any data is read: the same check and words as the dicomnode commands
            pick_device(device)
        module = importlib.import_module(COMMANDS[argv[0]][0])
        return int(module.main(argv[1:]) or 0)
    except DeviceError as exc:
        print(f"--device: {exc}", file=sys.stderr)
        return 2


def _option(argv: list[str], name: str) -> str | None:
    """The value of `name VALUE` or `name=VALUE` in argv, the last one given, or None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


if __name__ == "__main__":
    sys.exit(main())
