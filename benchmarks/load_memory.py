"""Peak memory while a site loads, against the float32 arrays the loaded site holds.

Writes two sites of one large scan each in a temporary folder: a CT DICOM series (one int16 file per slice) and an
MR NIfTI scan (int16 with a scaling, stored LAS so that it is reoriented), then measures with :mod:`tracemalloc`
(numpy reports its arrays to it) the peak of ``load_site`` and of the reader alone. The reference is the site's
final float32 size: every scan as read (scanner units) plus its normalised copy, which the loaded site holds; the
target is a peak of at most about twice that.

    python benchmarks/load_memory.py [--shape 256 256 200]
"""

from __future__ import annotations

import argparse
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from client.data.dicom import read_dicom_folder
from client.data.nifti import read_nifti
from client.data.site import Site, load_site

MIB = 2**20


def write_ct_series(folder: Path, shape: tuple[int, int, int]) -> None:
    """One int16 file per slice (axial, 0.7 mm pixels, 1 mm slices), HU = stored - 1024."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    uid = generate_uid()
    for k in range(shape[2]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.Modality, ds.PatientID, ds.SeriesInstanceUID = "CT", "BENCH", uid
        ds.set_pixel_data(rng.integers(0, 2000, shape[:2], dtype=np.int16), "MONOCHROME2", 16)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, float(k)], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 1.0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.save_as(folder / f"{k:04d}.dcm", enforce_file_format=True)
    (folder.parent / "site.toml").write_text('modality = "CT"\n')


def write_mr_nifti(path: Path, shape: tuple[int, int, int]) -> None:
    """An int16 NIfTI with scl_slope 0.5, stored with X flipped (LAS, as dcm2niix writes), so it is reoriented."""
    path.parent.mkdir(parents=True)
    data = np.random.default_rng(1).integers(0, 3000, shape, dtype=np.int16)
    image = nib.Nifti1Image(data, np.diag([-1.0, 1.0, 1.0, 1.0]))
    image.header.set_slope_inter(0.5, 0.0)
    nib.save(image, path)
    (path.parent / "site.toml").write_text('modality = "MR"\n')


def traced_peak(work: Callable[[], Any]) -> tuple[Any, int]:
    """(what ``work`` returns, its peak traced bytes above those traced before it)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    result = work()
    peak = tracemalloc.get_traced_memory()[1] - before
    tracemalloc.stop()
    return result, peak


def held_bytes(site: Site) -> tuple[int, int]:
    """(bytes of the scans as read, bytes of every float32 array the site holds: scans and normalised images)."""
    arrays = {id(a): a for scan in site.scans for a in (scan.volume.array, scan.image)}
    scans = {id(scan.volume.array): scan.volume.array for scan in site.scans}
    return sum(a.nbytes for a in scans.values()), sum(a.nbytes for a in arrays.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 256, 200), metavar=("X", "Y", "Z"))
    shape = tuple(parser.parse_args().shape)
    with tempfile.TemporaryDirectory() as tmp:
        ct_site, mr_site = Path(tmp) / "ct", Path(tmp) / "mr"
        write_ct_series(ct_site / "series", shape)
        write_mr_nifti(mr_site / "scan.nii.gz", shape)
        load_site(ct_site), load_site(mr_site)  # first use imports decoders and fills pydicom's caches: not counted
        print(f"peak traced memory while loading, one {'x'.join(map(str, shape))} scan per site "
              f"({np.prod(shape) * 4 / MIB:.0f} MiB as float32)")
        for name, site_dir, read in (
            ("CT DICOM series", ct_site, lambda: read_dicom_folder(ct_site / "series")[0][0]),
            ("MR NIfTI, reoriented", mr_site, lambda: read_nifti(mr_site / "scan.nii.gz", "MR")),
        ):
            volume, reader_peak = traced_peak(read)
            print(f"  {name}, reader alone: peak {reader_peak / MIB:.0f} MiB = "
                  f"{reader_peak / volume.array.nbytes:.2f} x the float32 volume")
            del volume
            site, peak = traced_peak(lambda d=site_dir: load_site(d))
            scans, held = held_bytes(site)
            print(f"  {name}, load_site: peak {peak / MIB:.0f} MiB = {peak / held:.2f} x the site's final float32 "
                  f"size ({held / MIB:.0f} MiB: scan and normalised image; {peak / scans:.2f} x the scan alone)")
            del site
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
