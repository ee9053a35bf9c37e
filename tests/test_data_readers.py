"""Readers (NIfTI, DICOM), volume checks and normalisation, on real scans and on files written from known arrays."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from client.data.dicom import read_dicom_files, read_dicom_folder
from client.data.errors import ScanError, SiteError, SitesFolderError
from client.data.nifti import bids_subject, nifti_scan_id, read_nifti
from client.data.normalise import Normalisation, fit_normalisation
from client.data.volume import Volume, validate_volume
from client.state import StateError
from shared_models.checkpoint import CheckpointError
from shared_models.errors import ExplainedError
from tests.conftest import DATA


def _assert_geometry(volume: Volume, written) -> None:
    """Voxel (0, 0, k) sits at slice k's ImagePositionPatient (RAS), one X step is the row direction."""
    assert volume.spacing == pytest.approx(written.spacing)
    for k, position in enumerate(written.positions_ras):
        assert volume.affine @ np.array([0, 0, k, 1.0]) == pytest.approx([*position, 1.0], abs=1e-4)
    assert volume.affine[:3, 0] == pytest.approx(written.row_ras, abs=1e-6)


# ------------------------------------------------------------------------------------------------ NIfTI


def test_colin27_reads_with_shape_spacing_and_ras_affine():
    volume = read_nifti(DATA / "mri" / "colin27_t1_1mm.nii.gz")
    assert volume.array.shape == (181, 217, 181)
    assert volume.array.dtype == np.float32
    assert volume.spacing == pytest.approx((1.0, 1.0, 1.0))
    assert nib.aff2axcodes(volume.affine) == ("R", "A", "S")
    assert (volume.modality, volume.subject) == ("MR", "colin27_t1_1mm")
    assert volume.array.min() == 0 and volume.array.max() == 254  # uint8 source
    validate_volume(volume)


def test_ct_atlas_reads_in_hounsfield_units():
    volume = read_nifti(DATA / "ct" / "ct_brain_atlas_1mm.nii.gz", modality="CT")
    assert volume.array.shape == (202, 202, 179)
    assert volume.spacing == pytest.approx((1.0, 1.0, 1.0))
    assert volume.modality == "CT"
    assert -100 < volume.array.min() < 0 < 200 < volume.array.max() < 1000  # brain-only HU


def test_nifti_is_reoriented_to_closest_canonical(tmp_path):
    data = np.arange(20 * 24 * 5, dtype=np.float32).reshape(20, 24, 5)
    affine = np.array([[-0.5, 0, 0, 10], [0, 0, 2.0, -3], [0, 0.8, 0, 7], [0, 0, 0, 1]])  # L, S, A axes
    path = tmp_path / "las.nii"
    nib.save(nib.Nifti1Image(data, affine), path)
    volume = read_nifti(path)
    assert volume.array.shape == (20, 5, 24)
    assert volume.spacing == pytest.approx((0.5, 2.0, 0.8))
    np.testing.assert_array_equal(volume.array, np.transpose(data[::-1], (0, 2, 1)))
    # the same voxel is at the same place in the world before and after
    assert volume.affine @ [0, 0, 0, 1] == pytest.approx(affine @ [19, 0, 0, 1])
    assert nib.aff2axcodes(volume.affine) == ("R", "A", "S")


@pytest.mark.parametrize(
    ("scan_id", "subject"),
    [
        ("sub-01/ses-2/anat/sub-01_ses-2_T1w", "sub-01"),
        ("study/sub-A7/anat/T1w", "sub-A7"),  # the folder, whatever the file is called
        ("sub-07_T2w", "sub-07"),
        ("sub-07", "sub-07"),
        ("anat/sub-3_run-1_T1w", "sub-3"),
        ("head1", None),
        ("subject-01/scan", None),
        ("sub-01-old/scan", None),  # not a BIDS label (letters and digits only)
        ("sub-_T1w", None),
    ],
)
def test_bids_subject_of_a_scan_id(scan_id, subject):
    assert bids_subject(scan_id) == subject


def test_nifti_scan_id_is_the_path_below_the_site_without_suffix(tmp_path):
    assert nifti_scan_id(tmp_path / "sub-01" / "anat" / "x.nii.gz", tmp_path) == "sub-01/anat/x"
    assert nifti_scan_id(tmp_path / "Head.NII", tmp_path) == "Head"
    volume = read_nifti(DATA / "mri" / "colin27_t1_1mm.nii.gz")
    assert volume.subject == volume.patient == "colin27_t1_1mm"  # read alone, a scan is its own patient


def test_2d_nifti_is_refused_unless_allowed(tmp_path):
    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((32, 40), np.float32), np.eye(4)), path)
    with pytest.raises(ScanError, match="2D image") as caught:
        read_nifti(path)
    assert caught.value.path == str(path) and "3D" in caught.value.hint
    assert read_nifti(path, allow_2d=True).array.shape == (32, 40, 1)
    coronal = tmp_path / "coronal.nii"  # a single slice along Y after reorientation: moved to Z
    nib.save(nib.Nifti1Image(np.ones((32, 1, 40), np.float32), np.eye(4)), coronal)
    volume = read_nifti(coronal, allow_2d=True)
    assert volume.array.shape == (32, 40, 1)
    assert volume.affine @ [0, 5, 0, 1] == pytest.approx([0, 0, 5, 1])


def test_4d_nifti_is_refused(tmp_path):
    path = tmp_path / "fmri.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((20, 20, 20, 3), np.float32), np.eye(4)), path)
    with pytest.raises(ScanError, match="4D"):
        read_nifti(path)


@pytest.mark.parametrize("content", [b"not an image at all\n" * 20, b""])
def test_non_nifti_named_nii_is_a_scan_error(tmp_path, content):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(content)
    with pytest.raises(ScanError, match="cannot be read as NIfTI") as caught:
        read_nifti(path)
    assert str(path) in str(caught.value)


# ----------------------------------------------------------------------------------- real DICOM slices


@pytest.mark.parametrize(
    ("name", "modality", "shape", "spacing"),
    [
        ("head_ct_slice_693.dcm", "CT", (512, 512, 1), (0.478516, 0.478516, 5.0)),
        ("shoulder_mr_slice_philips.dcm", "MR", (1024, 1024, 1), (0.195313, 0.195313, 6.0)),
        ("spine_ct_small_ge.dcm", "CT", (128, 128, 1), (0.661468, 0.661468, 5.0)),
        ("mr_small_toshiba.dcm", "MR", (64, 64, 1), (0.3125, 0.3125, 0.8)),
    ],
)
def test_real_single_slices_are_one_slice_volumes(name, modality, shape, spacing):
    path = DATA / "dicom" / name
    volumes, skipped = read_dicom_files([path])
    assert skipped == []
    (volume,) = volumes
    ds = pydicom.dcmread(path)
    assert volume.array.shape == shape
    assert volume.spacing == pytest.approx(spacing, rel=1e-5)
    assert (volume.modality, volume.source, volume.subject) == (modality, str(path), ds.SeriesInstanceUID)
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    expected = ds.pixel_array.T.astype(np.float64) * slope + intercept
    np.testing.assert_allclose(volume.array[:, :, 0], expected, rtol=1e-6, atol=1e-3)
    position_ras = np.array([-1, -1, 1]) * np.array([float(v) for v in ds.ImagePositionPatient])
    assert volume.affine[:3, 3] == pytest.approx(position_ras)
    validate_volume(volume)


def test_oblique_philips_slice_keeps_its_orientation():
    volume, = read_dicom_files([DATA / "dicom" / "shoulder_mr_slice_philips.dcm"])[0]
    row_lps = np.array([0.569486, 0.822001, 0.0])
    expected = np.array([-1, -1, 1]) * row_lps / np.linalg.norm(row_lps) * 0.195313
    assert volume.affine[:3, 0] == pytest.approx(expected, abs=1e-6)
    assert volume.affine[:3, 1] == pytest.approx([0, 0, -0.195313], abs=1e-6)  # columns run to -S (feet)


# ------------------------------------------------------------------------------- written DICOM series


def test_series_is_ordered_by_position_and_rescaled(tmp_path, make):
    written = make.series(tmp_path / "series", make.stored((40, 32, 12)))
    (volume,), skipped = read_dicom_folder(tmp_path / "series")
    assert skipped == []
    np.testing.assert_array_equal(volume.array, written.expected)
    _assert_geometry(volume, written)
    assert volume.subject == written.uid
    assert volume.source == f"{tmp_path / 'series'}#{written.uid}"
    assert volume.modality == "CT"


def test_series_stacked_against_file_order_when_positions_descend(tmp_path, make):
    # axial slices listed feet-first with a negative-going normal: row (0, 1, 0) x col (1, 0, 0) = (0, 0, -1)
    written = make.series(
        tmp_path / "ax", make.stored((24, 20, 7), seed=3), row_dir=(0.0, 1.0, 0.0), col_dir=(1.0, 0.0, 0.0),
        spacing=(0.5, 0.6, 1.25), origin_lps=(100.0, -50.0, -30.0), slope=1.5, intercept=-7.0, modality="MR",
    )
    (volume,), _ = read_dicom_folder(tmp_path / "ax")
    np.testing.assert_array_equal(volume.array, written.expected)
    _assert_geometry(volume, written)


def test_two_series_in_one_folder_are_split_by_uid(tmp_path, make):
    a = make.series(tmp_path / "mixed", make.stored((30, 30, 5), seed=1), prefix="a")
    b = make.series(tmp_path / "mixed", make.stored((20, 24, 9), seed=2), spacing=(1.0, 1.0, 3.0), prefix="b", seed=5)
    volumes, skipped = read_dicom_folder(tmp_path / "mixed")
    assert skipped == []
    by_uid = {volume.subject: volume for volume in volumes}
    assert set(by_uid) == {a.uid, b.uid}
    for written in (a, b):
        np.testing.assert_array_equal(by_uid[written.uid].array, written.expected)
        _assert_geometry(by_uid[written.uid], written)


def test_series_in_nested_folders_and_split_across_folders(tmp_path, make):
    written = make.series(tmp_path / "tmp", make.stored((20, 20, 6)))
    for i, path in enumerate(written.files):  # scatter one series over two sub-folders
        target = tmp_path / "site" / "patient" / ("first" if i % 2 else "second") / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        path.rename(target)
    (volume,), skipped = read_dicom_folder(tmp_path / "site")
    assert skipped == []
    np.testing.assert_array_equal(volume.array, written.expected)
    assert volume.source == f"{tmp_path / 'site' / 'patient'}#{written.uid}"


def test_series_of_one_patient_share_the_patient_id(tmp_path, make):
    a = make.series(tmp_path / "a", make.stored((20, 20, 3), seed=1))  # the writer's PatientID is "TEST"
    b = make.series(tmp_path / "b", make.stored((20, 20, 3), seed=2))
    volumes, _ = read_dicom_folder(tmp_path)
    assert {v.subject: v.patient for v in volumes} == {a.uid: "TEST", b.uid: "TEST"}


def test_enhanced_multiframe_uses_per_frame_positions(tmp_path, make):
    written = make.multiframe(tmp_path / "enhanced.dcm", make.stored((28, 26, 8), seed=4))
    (volume,), skipped = read_dicom_files([tmp_path / "enhanced.dcm"])
    assert skipped == []
    assert volume.modality == "MR" and volume.source == str(tmp_path / "enhanced.dcm")
    np.testing.assert_allclose(volume.array, written.expected)
    _assert_geometry(volume, written)


def test_multiframe_without_positions_is_skipped(tmp_path, make):
    path = tmp_path / "cine.dcm"
    make.multiframe(path, make.stored((28, 26, 8)), per_frame_positions=False)
    volumes, (skipped,) = read_dicom_files([path])
    assert volumes == []
    assert skipped.path == str(path) and "cannot be placed in space" in skipped.reason


def test_duplicate_copies_of_a_file_are_skipped_once(tmp_path, make):
    written = make.series(tmp_path / "s", make.stored((20, 20, 4)))
    copy = tmp_path / "s" / "copy" / "again.dcm"
    copy.parent.mkdir()
    copy.write_bytes(written.files[0].read_bytes())
    (volume,), (skipped,) = read_dicom_folder(tmp_path / "s")
    np.testing.assert_array_equal(volume.array, written.expected)
    assert "duplicate" in skipped.reason and str(written.files[0]) in skipped.reason


# --------------------------------------------------------------------------------------- bad DICOM input


def test_bad_files_are_skipped_with_reasons_and_good_series_still_loads(tmp_path, make):
    folder = tmp_path / "site"
    written = make.series(folder, make.stored((20, 20, 5)))
    source = (DATA / "dicom" / "spine_ct_small_ge.dcm").read_bytes()
    bad = {
        "truncated_pixels.dcm": (source[: len(source) - 1000], "truncated"),
        "truncated_header.dcm": (source[:2000], "truncated"),
        "garbage.dcm": (b"\0" * 128 + b"DICM" + bytes(range(256)) * 4, "without image data"),
        "notes.txt": (b"scanned on Monday\n", "neither a DICOM file nor a NIfTI file"),
        "empty.dcm": (b"", "neither a DICOM file nor a NIfTI file"),
    }
    for name, (content, _) in bad.items():
        (folder / name).write_bytes(content)
    volumes, skipped = read_dicom_folder(folder)
    (volume,) = volumes
    np.testing.assert_array_equal(volume.array, written.expected)
    reasons = {Path(item.path).name: item.reason for item in skipped}
    assert set(reasons) == set(bad)
    for name, (_, problem) in bad.items():
        assert problem in reasons[name], (name, reasons[name])
        assert "remove it" in reasons[name] or "copy it again" in reasons[name]


def test_series_with_mixed_image_sizes_is_skipped_naming_the_series(tmp_path, make):
    written = make.series(tmp_path / "s", make.stored((20, 20, 4)))
    odd = pydicom.dcmread(written.files[0])
    odd.set_pixel_data(np.zeros((10, 12), np.int16), "MONOCHROME2", 16)
    odd.ImagePositionPatient = [0, 99, 0]
    odd.save_as(tmp_path / "s" / "localiser.dcm")
    volumes, (skipped,) = read_dicom_folder(tmp_path / "s")
    assert volumes == []
    assert skipped.path == f"{tmp_path / 's'}#{written.uid}"
    assert "mixed series" in skipped.reason and "image size" in skipped.reason


def test_series_mixing_patient_ids_is_skipped_without_showing_them(tmp_path, make):
    written = make.series(tmp_path / "s", make.stored((20, 20, 4)))
    other = pydicom.dcmread(written.files[0])
    other.PatientID = "SOMEONE-ELSE"
    other.save_as(written.files[0])
    volumes, (skipped,) = read_dicom_folder(tmp_path / "s")
    assert volumes == []
    assert "mixed series" in skipped.reason and "PatientID" in skipped.reason
    assert "SOMEONE-ELSE" not in skipped.reason and "TEST" not in skipped.reason


def test_series_with_two_images_per_position_is_skipped(tmp_path, make):
    written = make.series(tmp_path / "s", make.stored((20, 20, 4)))
    echo = pydicom.dcmread(written.files[0])
    echo.SOPInstanceUID = pydicom.uid.generate_uid()
    echo.save_as(tmp_path / "s" / "echo2.dcm")
    _, (skipped,) = read_dicom_folder(tmp_path / "s")
    assert "slice position" in skipped.reason and "echoes" in skipped.reason


def test_series_with_a_missing_slice_is_skipped(tmp_path, make):
    written = make.series(tmp_path / "s", make.stored((20, 20, 6)))
    middle = min(written.files, key=lambda p: abs(pydicom.dcmread(p).ImagePositionPatient[1] - 37.5))
    middle.unlink()
    _, (skipped,) = read_dicom_folder(tmp_path / "s")
    assert "uneven slice spacing" in skipped.reason and "missing" in skipped.reason


def test_missing_dicom_folder_is_a_scan_error(tmp_path):
    with pytest.raises(ScanError, match="not an existing folder"):
        read_dicom_folder(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------- validation


def _volume(array: np.ndarray, source: str = "scan.nii.gz") -> Volume:
    return Volume(array.astype(np.float32), (1.0, 1.0, 1.0), np.eye(4), "MR", source, "scan")


@pytest.mark.parametrize(
    ("array", "problem"),
    [
        (np.where(np.arange(32 * 32 * 4).reshape(32, 32, 4) == 5, np.nan, 1.0), "1 of 4096 voxels are NaN or infinite"),
        (np.full((32, 32, 4), np.inf), "NaN or infinite"),
        (np.full((32, 32, 4), 7.0), "constant volume"),
        (np.arange(8 * 40 * 4).reshape(8, 40, 4), "smaller than the 16x16"),
    ],
)
def test_validate_volume_names_the_problem(array, problem):
    with pytest.raises(ScanError, match=problem) as caught:
        validate_volume(_volume(array))
    assert caught.value.path == "scan.nii.gz"


@pytest.mark.parametrize(
    ("kind", "builtin"),
    [
        (ScanError, ValueError),
        (SiteError, RuntimeError),
        (SitesFolderError, FileNotFoundError),
        (CheckpointError, ValueError),
        (StateError, RuntimeError),
    ],
)
def test_explained_errors_share_one_message_format_and_pickle(kind, builtin):
    error = kind("/data/x.dcm", "damaged", "copy it again")
    assert str(error) == "/data/x.dcm: damaged. copy it again" and error.reason == "damaged. copy it again"
    assert isinstance(error, ExplainedError) and isinstance(error, builtin)
    again = pickle.loads(pickle.dumps(error))  # Ray pickles exceptions raised in its workers
    assert type(again) is kind and str(again) == str(error) and again.reason == error.reason


# -------------------------------------------------------------------------------------- normalisation


def test_ct_window_round_trip_and_clipping():
    volume = _volume(np.linspace(-1000, 1000, 32 * 32 * 2).reshape(32, 32, 2))
    volume = Volume(volume.array, volume.spacing, volume.affine, "CT", volume.source, volume.subject)
    norm = fit_normalisation(volume)
    assert norm == Normalisation("ct-window", -160.0, 240.0)
    image = norm.apply(volume.array)
    assert image.dtype == np.float32 and image.min() == 0.0 and image.max() == 1.0
    inside = (volume.array >= -160) & (volume.array <= 240)
    np.testing.assert_allclose(norm.invert(image)[inside], volume.array[inside], atol=1e-3)
    assert norm.apply(np.array([40.0]))[0] == pytest.approx(0.5)


def test_mr_percentiles_on_colin27_and_dict_round_trip():
    volume = read_nifti(DATA / "mri" / "colin27_t1_1mm.nii.gz")
    norm = fit_normalisation(volume)
    foreground = volume.array[volume.array > 0]
    assert norm.kind == "mr-percentile"
    assert (norm.lo, norm.hi) == pytest.approx(tuple(np.percentile(foreground, [0.5, 99.5])))
    image = norm.apply(volume.array)
    assert 0.0 == image.min() < image.max() == 1.0
    assert np.mean(image == 1.0) < 0.01  # only the top 0.5 % of the head saturates
    restored = Normalisation.from_dict(json.loads(json.dumps(norm.to_dict())))
    assert restored == norm
    mid = (volume.array > norm.lo) & (volume.array < norm.hi)
    np.testing.assert_allclose(restored.invert(image)[mid], volume.array[mid], rtol=1e-5, atol=1e-3)


def test_mr_without_positive_voxels_uses_all_voxels():
    norm = fit_normalisation(_volume(-np.arange(32 * 32 * 2, dtype=np.float32).reshape(32, 32, 2)))
    assert norm.lo < norm.hi < 0


@pytest.mark.parametrize(
    "data",
    [{"kind": "ct-window", "lo": 1.0}, {"kind": "zscore", "lo": 0, "hi": 1}, {"kind": "ct-window", "lo": 5, "hi": 5}],
)
def test_normalisation_from_bad_dict_raises(data):
    with pytest.raises(ValueError):
        Normalisation.from_dict(data)
