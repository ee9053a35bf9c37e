"""``fedsr infer MODEL INPUT OUTPUT``: apply a trained model to a scan, or to every scan of a folder.

The ``fedsr`` root (``shared_models.cli``) names the command and imports this module when it runs. Exit code 0:
done; 1: a batch finished with failed scans (listed at the end); 2: refused (nothing written).

A model conditioned on the acquisition takes ``--acquisition "field=value ..."`` (over a DICOM input's headers and
the defaults); a model with a personal head needs ``--head`` (a site's head file from its state folder).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from client.device import resolve_device
from client.inference.batch import infer_folder
from client.inference.model import load_model
from client.inference.run import FORMATS, InferOptions, InferResult, infer_scan
from client.inference.scans import ScanSource, single_source
from shared_models.conditioning import ACQUISITION_FIELDS
from shared_models.errors import ExplainedError
from shared_models.image import MODALITIES

infer_app = typer.Typer(pretty_exceptions_show_locals=False, add_completion=False)  # locals can hold scan data


@infer_app.command("infer")
def infer(
    model: Path = typer.Argument(..., help="A checkpoint (.pt), or a finished run's folder (its final_model.pt)."),
    input_path: Path = typer.Argument(..., metavar="INPUT",
                                      help="A NIfTI file, a DICOM series folder, or a folder of scans (batch mode)."),
    output: Path = typer.Argument(..., help="A .nii/.nii.gz file or a folder for the DICOM series; in batch mode "
                                  "the folder for all outputs."),
    output_format: Optional[str] = typer.Option(None, "--format", help=f"{' or '.join(FORMATS)} (default: OUTPUT's "
                                                "name tells, .nii/.nii.gz or a folder; in batch mode as each input)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda or cuda:N."),
    tile: Optional[int] = typer.Option(None, "--tile", min=9, help="3D models: tile side in input voxels "
                                       "(default: from the free memory)."),
    batch: Optional[int] = typer.Option(None, "--batch", min=1, help="Slices (2D) or tiles (3D) per forward pass "
                                        "(default: from the free memory)."),
    modality: Optional[str] = typer.Option(None, "--modality", help="A NIfTI input's modality, MR or CT (NIfTI "
                                           "records none; default: the model's)."),
    site: Optional[str] = typer.Option(None, "--site", help="Map intensities with this site's rule (needed where "
                                       "the model's sites mapped them differently)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    preview: bool = typer.Option(False, "--preview", help="Write NAME_preview.png beside each output: input, "
                                 "interpolation and SR in one window."),
    acquisition: Optional[str] = typer.Option(
        None, "--acquisition", help="Models conditioned on the acquisition: the scans' description as FIELD=VALUE "
        "pairs, over what DICOM headers say (fields: " + ", ".join(f"{f.name} in {f.unit}" for f in ACQUISITION_FIELDS)
        + "); e.g. \"field_strength_t=3 slice_thickness_mm=1\"."),
    head: Optional[Path] = typer.Option(None, "--head", help="Models with a personal head: the site's head file "
                                        "(SITE/.fedsr-state/personal-head-<hash>.pt)."),
) -> None:
    """Super-resolve a scan with a trained model: the output lies where the input did in patient space, in scanner
    units (HU for CT), marked as derived (DICOM: a new series; NIfTI: the header's description).

    INPUT a folder of several scans runs each into the folder OUTPUT; the ones that fail are listed at the end.
    """
    if output_format is not None and output_format not in FORMATS:
        raise typer.BadParameter(f"use one of {', '.join(FORMATS)}", param_hint="--format")
    if modality is not None and modality.upper() not in MODALITIES:
        raise typer.BadParameter(f"use one of {', '.join(MODALITIES)}", param_hint="--modality")
    options = InferOptions(output_format=output_format, modality=modality and modality.upper(), site=site,
                           batch_size=batch, tile=tile, overwrite=overwrite, preview=preview,
                           acquisition=parse_acquisition(acquisition))
    try:
        torch_device = resolve_device(device)
    except RuntimeError as error:  # CUDA asked for where there is none
        raise typer.BadParameter(str(error), param_hint="--device") from None
    console = Console(stderr=True, highlight=False)
    try:
        loaded = load_model(model, torch_device, head=head)
        source = single_source(input_path)
        console.print(f"{escape(loaded.describe())} on {torch_device}")
        with _progress_bar(console) as bar:
            if source is not None:
                result = infer_scan(loaded, source, output, options, device=torch_device,
                                    progress=_tracker(bar, source))
            else:
                report = infer_folder(loaded, input_path, output, options, device=torch_device,
                                      on_scan=lambda i, n, scan: _tracker(bar, scan, f"[{i + 1}/{n}] "))
    except (ExplainedError, FileNotFoundError) as error:
        console.print(f"[red]error:[/] {escape(str(error))}", soft_wrap=True)
        raise typer.Exit(2) from None
    if source is not None:
        _print_result(console, result)
        raise typer.Exit(0)
    for done in report.done:
        _print_result(console, done)
    console.print(f"{len(report.done)} scan(s) done, {len(report.failed)} failed")
    for location, reason in report.failed:
        console.print(f"[red]failed:[/] {escape(location)}: {escape(reason)}", soft_wrap=True)
    raise typer.Exit(1 if report.failed else 0)


def parse_acquisition(text: str | None) -> dict[str, float]:
    """``--acquisition``'s ``"field=value field=value"`` (spaces or commas between pairs) -> ``{field: value}``;
    typer.BadParameter naming an unknown field or a value that is not a finite number >= 0."""
    fields = {f.name: f for f in ACQUISITION_FIELDS}
    parsed = {}
    for pair in (text or "").replace(",", " ").split():
        name, _, value = pair.partition("=")
        if name not in fields:
            raise typer.BadParameter(f"unknown field {name!r} in {pair!r}; the fields: {', '.join(fields)}",
                                     param_hint="--acquisition")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number) or number < 0:
            raise typer.BadParameter(f"{name} must be a number >= 0 ({fields[name].unit}), got {value!r}",
                                     param_hint="--acquisition")
        parsed[name] = number
    return parsed


def _progress_bar(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("slices"),
                    TimeElapsedColumn(), console=console)


def _tracker(bar: Progress, source: ScanSource, prefix: str = "") -> Callable[[int, int], None]:
    """A progress callback drawing one bar for ``source``, from its first slice on."""
    tasks = []

    def update(done: int, total: int) -> None:
        if not tasks:
            tasks.append(bar.add_task(escape(prefix + source.name), total=total))
        bar.update(tasks[0], completed=done)

    return update


def _print_result(console: Console, result: InferResult) -> None:
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)
    shapes = " -> ".join("x".join(map(str, shape)) for shape in (result.input_shape, result.output_shape))
    console.print(f"{escape(result.source)} ({shapes}) -> {escape(str(result.output))} in {result.seconds:.1f} s")
    if result.preview is not None:
        console.print(f"  preview {escape(str(result.preview))}")
