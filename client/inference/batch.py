"""``fedsr infer MODEL DIR_IN DIR_OUT``: every scan of a folder, each written below DIR_OUT under its own relative
name; a scan that cannot be done is listed with the reason and the others go on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from client.data.nifti import is_nifti
from client.inference.errors import InferenceError
from client.inference.model import InferenceModel
from client.inference.run import InferOptions, InferResult, Progress, infer_scan
from client.inference.scans import ScanSource, list_scans
from shared_models.errors import ExplainedError


@dataclass
class BatchReport:
    """What a batch did: ``done`` scans, and ``failed`` ones as (scan location, reason)."""

    done: list[InferResult] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def output_for(source: ScanSource, out_dir: Path, output_format: str | None) -> Path:
    """Where a scan's output goes: ``out_dir/NAME`` (a series folder) or ``out_dir/NAME.nii.gz``, NAME the scan's
    path below the input folder; the format as asked, else as the input (a NIfTI input keeps its suffix)."""
    if (output_format or source.kind) == "dicom":
        return out_dir / source.name
    suffix = ".nii.gz" if source.kind != "nifti" or source.files[0].name.lower().endswith(".gz") else ".nii"
    return out_dir / (source.name + suffix)


def infer_folder(model: InferenceModel, in_dir: Path, out_dir: Path, options: InferOptions, *,
                 device: torch.device | str = "cpu",
                 on_scan: Callable[[int, int, ScanSource], Progress | None] | None = None) -> BatchReport:
    """Super-resolve every scan under ``in_dir`` into ``out_dir``.

    ``on_scan(i, n, source)``: called before scan ``i`` of ``n``; returns that scan's progress callback (or None).
    A scan that fails for any reason is listed in the report and the next one goes on; an existing output is such
    a failure unless ``options.overwrite``. Refuses an ``out_dir`` inside ``in_dir`` (a later run would read the
    outputs as inputs) and ``options.acquisition`` for a model that is not conditioned (every scan would fail).
    """
    model.check_acquisition(options.acquisition)
    if in_dir.resolve() == out_dir.resolve() or in_dir.resolve() in out_dir.resolve().parents:
        raise InferenceError(out_dir, f"lies inside the input folder {in_dir}", "write the outputs somewhere else")
    if is_nifti(out_dir) or out_dir.is_file():
        raise InferenceError(out_dir, f"is not a folder, and {in_dir} holds several scans (or none that is one "
                             "DICOM series): their outputs go into a folder", "give a folder as OUTPUT")
    sources = list_scans(in_dir)
    if not sources:
        raise InferenceError(in_dir, "holds no scan (NIfTI files or DICOM series)", "check the path")
    report = BatchReport()
    for i, source in enumerate(sources):
        progress = on_scan(i, len(sources), source) if on_scan is not None else None
        try:
            report.done.append(infer_scan(model, source, output_for(source, out_dir, options.output_format), options,
                                          device=device, progress=progress))
        except ExplainedError as error:  # names its file (the scan's, a file of it, or the output) and what to do
            report.failed.append((source.location, str(error)))
        except Exception as error:  # a batch goes on past any one scan's failure, named with its type
            report.failed.append((source.location, f"{type(error).__name__}: {error}"))
    return report
