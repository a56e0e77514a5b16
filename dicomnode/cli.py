"""The `dicomnode` command line. Each command is a thin wrapper: it parses arguments and calls
the module that does the work (imported lazily, so `--help` stays fast and torch loads only
when a command needs it)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="dicomnode: a DICOM node that turns sagittal T2 fat-sat spine MR into synthetic PET/T2FS "
                  "fusion series (Pix2Pix + conditional diffusion). Every command has --help.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_show_locals=False)

# --- node commands (serve, echo, send, rules, queue, status) ---------------------------------
from dicomnode import cli_node  # noqa: E402  (light imports only; heavy ones inside the commands)

cli_node.register(app)

# --- phantom ---------------------------------------------------------------------------------
@app.command()
def phantom(
    out_dir: Path = typer.Argument(..., help="Folder for <case>/{MR,PET,FUSION}/NNN.dcm and cases.json."),
    cases: int = typer.Option(10, "--cases", min=1, help="Number of studies (patients get 1-4 each)."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same files (UIDs included)."),
    lesion_fraction: float = typer.Option(0.5, "--lesion-fraction", min=0.0, max=1.0,
                                          help="Fraction of studies with spondylodiscitis."),
    min_matrix: int = typer.Option(256, "--min-matrix", min=32),
    max_matrix: int = typer.Option(512, "--max-matrix", min=32),
    min_slices: int = typer.Option(12, "--min-slices", min=1),
    max_slices: int = typer.Option(20, "--max-slices", min=1),
    preview: bool = typer.Option(False, "--preview", help="Also write OUT_DIR/preview.png (contact sheet)."),
    jobs: int = typer.Option(1, "--jobs", min=1, help="Worker processes (output does not depend on it)."),
    pet_grid: str = typer.Option("scanner", "--pet-grid",
                                 help="scanner: axial PET on its own grid, as a PET/MR writes it; "
                                      "mr: PET resampled onto the MR slices."),
    mr_format: str = typer.Option("classic", "--mr-format",
                                  help="classic: one MR Image per slice; legacy-enhanced or enhanced: the series as "
                                       "one multi-frame Legacy Converted Enhanced MR or Enhanced MR Image."),
    content: str = typer.Option("", "--content",
                                help="Out-of-distribution content under the T2FS header (to test the input gate): "
                                     "T1, STIR, T2 (no fat suppression), noise, ghosting, inhomogeneity, region."),
) -> None:
    """Write synthetic sagittal T2FS MR + FDG PET + PET/T2FS fusion studies (paired phantom data)."""
    import time

    from dicomnode.tools.phantom import generate

    if min_matrix > max_matrix or min_slices > max_slices:
        raise typer.BadParameter("a --min-* option exceeds its --max-* option")
    if pet_grid not in ("scanner", "mr"):
        raise typer.BadParameter("--pet-grid must be scanner or mr")
    if mr_format not in ("classic", "legacy-enhanced", "enhanced"):
        raise typer.BadParameter("--mr-format must be classic, legacy-enhanced or enhanced")
    from dicomnode.tools.phantom.generate import CONTENTS

    if content and content not in CONTENTS:
        raise typer.BadParameter(f"--content must be one of {', '.join(CONTENTS)}")
    t0 = time.perf_counter()
    with _progress("phantom studies") as bar:
        task = bar.add_task("studies", total=cases)
        records = generate(out_dir, cases, seed, lesion_fraction=lesion_fraction, min_matrix=min_matrix,
                           max_matrix=max_matrix, min_slices=min_slices, max_slices=max_slices, preview=preview,
                           jobs=jobs, on_case=lambda _r: bar.advance(task), pet_grid=pet_grid, mr_format=mr_format,
                           content=content)
    n_slices = sum(r["slices"] for r in records)
    typer.echo(f"{len(records)} studies, {len({r['patient_id'] for r in records})} patients, "
               f"{sum(r['lesion'] for r in records)} with lesion, {n_slices} slice pairs "
               f"in {time.perf_counter() - t0:.1f} s -> {out_dir}")


# --- conformance -----------------------------------------------------------------------------
@app.command()
def conformance(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the Markdown here (default: print it)."),
) -> None:
    """Print the DICOM Conformance Statement, generated from the node's own tables and defaults."""
    from dicomnode.conformance import statement

    text = statement()
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text, encoding="utf-8")
        typer.echo(f"conformance statement -> {out}")


# --- infer / demo ----------------------------------------------------------------------------
@app.command()
def infer(
    in_dir: Path = typer.Argument(..., exists=True, help="Folder (searched recursively) or file(s) with MR series."),
    out_dir: Path = typer.Argument(..., help="Folder for <output series UID>/<SOP UID>.dcm and infer.json."),
    png: bool = typer.Option(False, "--png", help="Also write per-slice previews (MR | synthetic)."),
    model: Optional[str] = typer.Option(None, "--model", help="Model name or folder (default: the config's, "
                                        "else the shipped model)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N"),
    select_all: bool = typer.Option(False, "--all", help="Process every series, ignoring the selection rules."),
    config: Optional[Path] = typer.Option(None, "--config", "-c",
                                          help="A node.toml whose \\[rules] and \\[inference] sections apply."),
    ray: Optional[str] = typer.Option(None, "--ray", help="Run on a Ray cluster at this address ('local': a "
                                      "one-machine Ray); restartable archive mode. Needs dicomnode\\[ray]."),
    actors: Optional[int] = typer.Option(None, "--actors", min=1, help="Model actors on the cluster (series at "
                                         "once); default: the config's [inference] ray_actors."),
) -> None:
    """Run select -> synthesise -> encode on files, offline (same engine as the node)."""
    import logging

    from dicomnode.config import Config, ConfigError, load_config
    from dicomnode.infer.model import ModelError
    from dicomnode.synthesize import load_synthesizer
    from dicomnode.tools.offline import run_infer

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(config) if config else Config()
    except ConfigError as exc:
        typer.echo(f"config error: {exc}", err=True)
        raise typer.Exit(2) from None
    _check_device(device or cfg.inference.device)
    inference = cfg.inference.model_copy(update={k: v for k, v in (("model", model), ("device", device)) if v})
    if ray:
        _infer_on_ray(in_dir, out_dir, cfg, inference, ray, actors, select_all, png)
        return
    try:
        synth = load_synthesizer(inference, safety=cfg.safety)
    except (ModelError, ValueError, RuntimeError) as exc:
        typer.echo(f"cannot load the model: {exc}", err=True)
        raise typer.Exit(3) from None
    with _progress("synthesising slices") as bar:
        outcomes = run_infer(in_dir, out_dir, synth, rules=cfg.rules, select_all=select_all, png=png, progress=bar)
    _report(outcomes, out_dir)


def _report(outcomes, out_dir: Path) -> None:
    for o in outcomes:
        if not o.selected:
            state = f"skipped: {o.reason}"
        elif o.error:
            state = f"FAILED: {o.error}"
        elif o.safety.startswith("refused"):
            state = f"REFUSED by the safety gate ({o.safety[len('refused: '):]})"
        else:
            score = "" if o.input_score is None else f", input score {o.input_score:.2f}"
            state = f"{o.outputs} images -> {o.output_dir} (safety: {o.safety}{score})"
        typer.echo(f"series {o.series_uid} ({o.slices} files): {state}")
    typer.echo(f"summary: {out_dir / 'infer.json'}")
    if any(o.error for o in outcomes):
        raise typer.Exit(1)


def _infer_on_ray(in_dir, out_dir, cfg, inference, address, actors, select_all, png) -> None:
    import importlib.util

    if png:
        typer.echo("--png is not available with --ray (previews need the pixels on this machine)", err=True)
        raise typer.Exit(2)
    if importlib.util.find_spec("ray") is None:
        typer.echo("--ray needs Ray: pip install 'dicomnode[ray]'", err=True)
        raise typer.Exit(2)
    from dicomnode.cluster import RayEngine
    from dicomnode.engine import Synthesis
    from dicomnode.tools.offline import run_infer_cluster

    inference = inference.model_copy(update={"backend": "ray", "ray_address": address,
                                             **({"ray_actors": actors} if actors else {})})
    engine = RayEngine(Synthesis(inference, safety=cfg.safety), inference)
    engine.start(wait_ready=True)
    try:
        ok, detail = engine.status()
        if not ok:
            typer.echo(f"cannot use the Ray cluster: {detail}", err=True)
            raise typer.Exit(3)
        typer.echo(detail)
        with _progress("series") as bar:
            outcomes = run_infer_cluster(in_dir, out_dir, engine, rules=cfg.rules, select_all=select_all,
                                         timeout=inference.timeout_seconds, progress=bar)
    finally:
        engine.stop()
    _report(outcomes, out_dir)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", help="Folder for the phantom, results and previews."),
    model: str = typer.Option("default", "--model", help="Model name or folder (default: the shipped model)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    seed: int = typer.Option(7, "--seed", help="Phantom case seed."),
) -> None:
    """Node on loopback + shipped model + phantom case + local PACS: prints previews, timings, metrics."""
    import logging

    from dicomnode.infer.model import ModelError
    from dicomnode.node import ModelStartError
    from dicomnode.tools.demo import RichStages, run_demo

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.ERROR)
    _check_device(device)
    stages = RichStages()
    try:
        run_demo(out, model=model, device=device, seed=seed, echo=stages.print, stages=stages)
    except (ModelError, ModelStartError) as exc:
        stages.finish()
        typer.echo(f"cannot load the model: {exc}", err=True)
        raise typer.Exit(3) from None
    except (RuntimeError, OSError) as exc:
        stages.finish()
        typer.echo(f"demo failed: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        stages.finish()


def _progress(label: str):
    """One rich bar: label, bar, done/total, elapsed, remaining."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn())


def _check_device(device: str) -> None:
    """--device must name a device this machine has: one sentence, not PyTorch's list of device types."""
    from dicomnode.synthesize import DeviceError, pick_device

    try:
        pick_device(device)
    except DeviceError as exc:
        typer.echo(f"--device: {exc}", err=True)
        raise typer.Exit(2) from None



def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    main()
