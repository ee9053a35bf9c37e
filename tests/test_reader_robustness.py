"""Readers that survive a real archive: malformed tags skip their file or series (never the site), compressed DICOM
decodes, the Modality LUT applies, a NIfTI scan's modality is declared or inferred with a warning, scans above the
voxel limit are refused before they are read, and loading a site stays within about twice its float32 size."""

from __future__ import annotations

import logging
import shutil
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import JPEG2000Lossless, MPEG2MPML, RLELossless
from rich.console import Console

from client.data.dicom import read_dicom_files, read_dicom_folder
from client.data.errors import ScanError, SiteError
from client.data.nifti import infer_modality, read_nifti
from client.data.site import load_site
from client.data.siteconfig import SiteConfig, load_site_config
from client.data.volume import DEFAULT_MAX_VOXELS, check_voxel_limit
from client.sites_report import check_site_folder, print_site_report
from client.tasks import task_for
from server.settings import RunSettings
from shared_models.registry import build_from_settings
from tests.conftest import DATA

REAL_CT_SLICE = DATA / "dicom" / "spine_ct_small_ge.dcm"  # GE CT, 128 x 128
CT_ATLAS = DATA / "ct" / "ct_brain_atlas_1mm.nii.gz"
COLIN = DATA / "mri" / "colin27_t1_1mm.nii.gz"


def _set_raw(ds: Dataset, keyword: str, text: bytes) -> None:
    """Store ``text`` as the raw value of a string-valued tag (DS, IS), as a faulty writer would: pydicom would
    refuse to encode such a value itself."""
    tag = Tag(keyword)
    text = text if len(text) % 2 == 0 else text + b" "
    vr = pydicom.datadict.dictionary_VR(tag)
    ds._dict[tag] = RawDataElement(tag, vr, len(text), text, 0, False, True)


#: One malformed value per tag, as a real archive holds them: (tag, raw value or number, what it is).
MALFORMED = [
    ("PixelSpacing", b"0.5", "one value"),
    ("RescaleSlope", b"1\\2", "two values"),
    ("ImagePositionPatient", b"1\\2", "two values"),
    ("ImageOrientationPatient", b"1\\0\\0\\1\\0\\0", "parallel directions"),
    ("SliceThickness", b"abc", "not a number"),
    ("RescaleIntercept", b"nan", "not finite"),
    ("Rows", 0, "zero"),
    ("BitsAllocated", 12, "not 8, 16 or 32"),
]


def _malform(path: Path, keyword: str, value: bytes | int, target: Path | None = None) -> Path:
    ds = pydicom.dcmread(path)
    if isinstance(value, bytes):
        _set_raw(ds, keyword, value)
    else:
        setattr(ds, keyword, value)
    ds.save_as(target or path)
    return target or path


@pytest.mark.parametrize(("keyword", "value", "what"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_real_slice_with_a_malformed_tag_is_skipped_naming_the_file_and_the_tag(tmp_path, make, keyword, value, what):
    good = make.series(tmp_path / "good", make.stored((20, 20, 3)))
    (tmp_path / "bad").mkdir()
    bad = _malform(REAL_CT_SLICE, keyword, value, tmp_path / "bad" / "slice.dcm")
    volumes, skipped = read_dicom_folder(tmp_path)
    assert [volume.subject for volume in volumes] == [good.uid]
    np.testing.assert_array_equal(volumes[0].array, good.expected)
    (item,) = skipped
    assert item.path == str(bad)
    assert f"malformed {keyword}" in item.reason or f"without {keyword}" in item.reason, (what, item.reason)
    assert "re-export the series" in item.reason


def test_a_malformed_frame_of_an_enhanced_file_is_skipped_naming_the_tag(tmp_path, make):
    path = tmp_path / "enhanced.dcm"
    make.multiframe(path, make.stored((20, 20, 4)))
    ds = pydicom.dcmread(path)
    _set_raw(ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence[0], "ImagePositionPatient", b"1\\2")
    ds.save_as(path)
    volumes, (item,) = read_dicom_files([path])
    assert volumes == [] and item.path == str(path) and "malformed ImagePositionPatient" in item.reason


def test_each_malformed_tag_skips_its_series_and_the_site_still_trains(tmp_path, make, round_job, one_thread):
    site_dir = tmp_path / "site"
    make.series(site_dir / "good", make.stored((40, 40, 8), seed=1))
    for k, (keyword, value, _) in enumerate(MALFORMED[:3]):  # PixelSpacing, RescaleSlope, ImagePositionPatient
        series = make.series(site_dir / keyword, make.stored((40, 40, 5), seed=k + 2), seed=k)
        middle = sorted(series.files, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[1]))[2]
        _malform(middle, keyword, value)
    settings = RunSettings(model="srcnn", local_steps=2, batch_size=2, patch_size=32)
    job = round_job(settings, server_round=1)
    task = task_for("srcnn")
    site = task.prepare(str(site_dir), job)
    reasons = [item.reason for item in site.skipped]
    for keyword, _, _ in MALFORMED[:3]:
        assert any(f"malformed {keyword}" in reason for reason in reasons), keyword  # the file, naming its tag
        (series,) = [item for item in site.skipped if item.path.startswith(str(site_dir / keyword) + "#")]
        assert "uneven slice spacing" in series.reason  # and its series, which lacks that slice
    assert site.split_counts["train"]["scans"] == 1
    model = build_from_settings(settings)
    result = task.train(model, model.state_dict(), site, job)
    assert result.metrics["num-examples"] > 0 and all(bool(w.isfinite().all()) for w in result.weights.values())
    console = Console(width=400, record=True)
    assert print_site_report(console, check_site_folder(site_dir), brief=True)
    out = console.export_text()
    assert all(f"malformed {keyword}" in out for keyword, _, _ in MALFORMED[:3])


# ------------------------------------------------------------------------------------------ compressed


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, RLELossless], ids=["jpeg2000-lossless", "rle-lossless"])
def test_a_compressed_series_written_here_is_read_through_the_site(tmp_path, make, syntax):
    written = make.series(tmp_path / "series", make.stored((36, 32, 4)))
    for path in written.files:
        ds = pydicom.dcmread(path)
        ds.compress(syntax)
        ds.save_as(path)
    assert pydicom.dcmread(written.files[0]).file_meta.TransferSyntaxUID == syntax
    site = load_site(tmp_path)
    (scan,) = site.split("train")
    assert site.skipped == []
    np.testing.assert_array_equal(scan.volume.array, written.expected)


def test_a_jpeg_ls_file_decodes_to_its_uncompressed_twin():
    # pydicom's own test file: the Toshiba MR slice of the shared data, JPEG-LS lossless (no JPEG-LS encoder is
    # installed to write one here; pylibjpeg-libjpeg decodes it)
    compressed = Path(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
    assert pydicom.dcmread(compressed).file_meta.TransferSyntaxUID.name == "JPEG-LS Lossless Image Compression"
    (jpeg_ls,), skipped = read_dicom_files([compressed])
    (plain,), _ = read_dicom_files([DATA / "dicom" / "mr_small_toshiba.dcm"])
    assert skipped == []
    np.testing.assert_array_equal(jpeg_ls.array, plain.array)


def test_a_transfer_syntax_no_installed_decoder_reads_is_skipped_before_decoding(tmp_path, make):
    written = make.series(tmp_path / "s", make.stored((20, 20, 1)))
    ds = pydicom.dcmread(written.files[0])
    ds.file_meta.TransferSyntaxUID = MPEG2MPML  # video: pydicom has no decoder for it
    ds.PixelData = encapsulate([b"\0" * 10])
    ds["PixelData"].VR = "OB"
    ds.save_as(written.files[0], enforce_file_format=True)
    volumes, (item,) = read_dicom_folder(tmp_path / "s")
    assert volumes == [] and "compressed as MPEG2 Main Profile / Main Level, which no installed decoder" in item.reason
    assert "re-export the series uncompressed" in item.reason


# -------------------------------------------------------------------------------------------- modality LUT


def _with_modality_lut(path: Path, lut: np.ndarray, first: int, entries: int | None = None, vr: str = "US") -> None:
    """Replace the file's rescale by a ModalityLUTSequence: ``lut`` (uint16) from stored value ``first`` on, its
    LUTData as a list of US values or OW bytes (little endian, like the file)."""
    ds = pydicom.dcmread(path)
    del ds.RescaleSlope, ds.RescaleIntercept  # the Modality LUT Module holds one or the other
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [entries or len(lut), first, 16])
    item.ModalityLUTType = "HU"
    item.add_new("LUTData", vr, lut.tolist() if vr == "US" else lut.astype("<u2").tobytes())
    ds.ModalityLUTSequence = Sequence([item])
    ds.save_as(path)


@pytest.mark.parametrize("vr", ["US", "OW"])
def test_the_modality_lut_sequence_maps_stored_values(tmp_path, make, vr):
    stored = make.stored((24, 20, 4))  # 0 .. about 560
    written = make.series(tmp_path / "s", stored)
    lut, first = (np.arange(300) * 3 + 7).astype(np.uint16), 100
    for path in written.files:
        _with_modality_lut(path, lut, first, vr=vr)
    (volume,), skipped = read_dicom_folder(tmp_path / "s")
    assert skipped == []
    expected = lut[np.clip(stored.astype(np.int64) - first, 0, len(lut) - 1)]  # PS3.3 C.11.1: clamped at both ends
    assert (stored < first).any() and (stored >= first + len(lut)).any()
    np.testing.assert_array_equal(volume.array, expected.astype(np.float32))


def test_a_short_modality_lut_skips_the_file(tmp_path, make):
    written = make.series(tmp_path / "s", make.stored((20, 20, 1)))
    _with_modality_lut(written.files[0], np.arange(10, dtype=np.uint16), 0, entries=50)
    volumes, (item,) = read_dicom_folder(tmp_path / "s")
    assert volumes == [] and "malformed ModalityLUTSequence LUTData" in item.reason and "50 values" in item.reason


# -------------------------------------------------------------------------------------------- NIfTI modality


def _crop(source: Path, target: Path, background: float | None = None) -> Path:
    """Every 4th voxel in-plane of 16 axial slices of a real scan (background voxels, 0, set to ``background``)."""
    image = nib.load(source)
    data = np.asarray(image.dataobj[::4, ::4, 80:96], dtype=np.float32)
    if background is not None:
        data[data == 0] = background
    target.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, image.affine), target)
    return target


def test_nifti_modality_is_inferred_from_intensities_with_a_warning(tmp_path, caplog):
    ct = _crop(CT_ATLAS, tmp_path / "ct" / "head.nii.gz", background=-1000.0)  # an unmasked CT: air around it
    masked_ct = _crop(CT_ATLAS, tmp_path / "masked.nii.gz")  # the atlas as shipped: brain only, background 0
    mr = _crop(COLIN, tmp_path / "mr.nii.gz")
    with caplog.at_level(logging.WARNING, logger="client.data.nifti"):
        assert read_nifti(ct).modality == "CT"
        assert read_nifti(mr).modality == "MR"
        assert read_nifti(masked_ct).modality == "MR"  # no air: the warning says a masked CT reads as MR too
    # the whole masked atlas keeps a few voxels of fat/CSF below 0 HU beside tissue above 100 HU: CT
    assert infer_modality(np.asarray(nib.load(CT_ATLAS).dataobj, dtype=np.float32)) == "CT"
    assert infer_modality(np.asarray(nib.load(COLIN).dataobj, dtype=np.float32)) == "MR"
    warnings = [record.getMessage() for record in caplog.records if record.name == "client.data.nifti"]
    assert len(warnings) == 3
    for path, words in ((ct, "read as CT"), (mr, "read as MR"), (masked_ct, "a CT masked to the body")):
        (line,) = [w for w in warnings if w.startswith(str(path))]
        assert words in line and 'Set modality = "CT" or "MR" in the site\'s site.toml' in line
    caplog.clear()
    site = load_site(tmp_path / "ct")
    assert (site.config.modality, site.config.modality_source) == ("CT", "intensities")
    assert site.scans[0].volume.modality == "CT" and site.scans[0].normalisation.kind == "ct-window"
    console = Console(width=300, record=True)
    print_site_report(console, check_site_folder(tmp_path / "ct"), brief=True)
    assert "CT (inferred from the scans' intensities: set modality in site.toml)" in console.export_text()
    (tmp_path / "ct" / "site.toml").write_text('modality = "MR"\n')  # site.toml wins, without a warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="client.data.nifti"):
        site = load_site(tmp_path / "ct")
    assert (site.scans[0].volume.modality, site.config.modality_source) == ("MR", "site.toml")
    assert [record for record in caplog.records if record.name == "client.data.nifti"] == []


# ---------------------------------------------------------------------------------------------- voxel limit


def test_scans_above_the_voxel_limit_are_refused_before_they_are_read(tmp_path, make):
    site_dir = tmp_path / "site"
    series = make.series(site_dir / "dicom", make.stored((20, 20, 4)))
    for path in series.files:  # pixel data that cannot be decoded: only a refusal from the header gets past it
        ds = pydicom.dcmread(path)
        ds.PixelData = b"\0" * 10
        ds.save_as(path)
    make.nifti(site_dir / "kept.nii.gz", np.random.default_rng(0).gamma(2.0, 50.0, (20, 20, 2)).astype(np.float32))
    big = make.nifti(site_dir / "big.nii.gz", np.random.default_rng(1).random((30, 30, 10)).astype(np.float32))
    big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])  # header intact, voxels cut off
    (site_dir / "site.toml").write_text('modality = "MR"\n')
    unlimited = {Path(item.path).name: item.reason for item in load_site(site_dir).skipped}
    assert "cannot be decoded" in unlimited[f"dicom#{series.uid}"]
    assert "cannot be read as NIfTI" in unlimited["big.nii.gz"]
    (site_dir / "site.toml").write_text('modality = "MR"\nmax_voxels = 1000\n')
    site = load_site(site_dir)
    assert [scan.volume.subject for scan in site.scans][:1] == ["kept"]  # 800 voxels: within the limit
    limited = {Path(item.path).name: item.reason for item in site.skipped}
    assert "20 x 20 x 4 = 1,600 voxels is above the site's limit of 1,000 (max_voxels" in limited[
        f"dicom#{series.uid}"]
    assert "30 x 30 x 10 = 9,000 voxels is above" in limited["big.nii.gz"]
    assert "raise max_voxels in site.toml" in limited["big.nii.gz"]


def test_the_default_voxel_limit_admits_a_512_by_1000_ct():
    assert SiteConfig(name="x").max_voxels == DEFAULT_MAX_VOXELS
    check_voxel_limit("ct", (512, 512, 1000), DEFAULT_MAX_VOXELS)
    with pytest.raises(ScanError, match="max_voxels"):
        check_voxel_limit("ct", (512, 512, 1200), DEFAULT_MAX_VOXELS)


@pytest.mark.parametrize("value", ["0", "-5", "true", '"big"', "2.5e8"])
def test_a_bad_max_voxels_is_refused(tmp_path, value):
    (tmp_path / "site.toml").write_text(f"max_voxels = {value}\n")
    with pytest.raises(SiteError, match="max_voxels must be") as caught:
        load_site_config(tmp_path)
    assert caught.value.path == str(tmp_path / "site.toml")


# ---------------------------------------------------------------------------------------------------- memory


def _peak(work):
    tracemalloc.start()
    try:
        return work(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_loading_a_site_peaks_within_twice_its_float32_size(tmp_path, make):
    make.series(tmp_path / "ct" / "series", make.stored((128, 96, 40)))
    stored = np.random.default_rng(0).integers(0, 3000, (128, 96, 40), dtype=np.int16)
    image = nib.Nifti1Image(stored, np.diag([-1.0, 1.0, 1.0, 1.0]))  # stored LAS: reoriented when read
    image.header.set_slope_inter(0.5, 10.0)
    (tmp_path / "mr").mkdir()
    nib.save(image, tmp_path / "mr" / "scan.nii.gz")
    for folder in ("ct", "mr"):
        load_site(tmp_path / folder)  # first use imports decoders and fills pydicom's caches: not counted
    (volume,), _ = read_dicom_folder(tmp_path / "ct" / "series")
    (_, reader_peak) = _peak(lambda: read_dicom_folder(tmp_path / "ct" / "series"))
    assert reader_peak <= 1.5 * volume.array.nbytes  # one float32 array filled slice by slice (was a stack: 2x)
    nifti, nifti_peak = _peak(lambda: read_nifti(tmp_path / "mr" / "scan.nii.gz", "MR"))
    np.testing.assert_allclose(nifti.array, stored[::-1].astype(np.float32) * 0.5 + 10.0)
    assert nifti_peak <= 1.6 * nifti.array.nbytes  # the stored int16 and one float32 copy
    for folder in ("ct", "mr"):
        site, peak = _peak(lambda f=folder: load_site(tmp_path / f))
        held = sum({id(a): a.nbytes for s in site.scans for a in (s.volume.array, s.image)}.values())
        assert peak <= 2.0 * held, (folder, peak / held)
