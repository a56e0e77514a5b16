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
) -> None:
    """Write synthetic sagittal T2FS MR + FDG PET + PET/T2FS fusion studies (paired phantom data)."""
    import time

    from dicomnode.phantom import generate

    if min_matrix > max_matrix or min_slices > max_slices:
        raise typer.BadParameter("a --min-* option exceeds its --max-* option")
    t0 = time.perf_counter()
    records = generate(out_dir, cases, seed, lesion_fraction=lesion_fraction, min_matrix=min_matrix,
                       max_matrix=max_matrix, min_slices=min_slices, max_slices=max_slices, preview=preview,
                       jobs=jobs)
    n_slices = sum(r["slices"] for r in records)
    typer.echo(f"{len(records)} studies, {len({r['patient_id'] for r in records})} patients, "
               f"{sum(r['lesion'] for r in records)} with lesion, {n_slices} slice pairs "
               f"in {time.perf_counter() - t0:.1f} s -> {out_dir}")


# --- infer / demo ----------------------------------------------------------------------------


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    main()
