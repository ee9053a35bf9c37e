"""Site folders: discovery, skipping bad files with reasons, site.toml, normalisation and subject-level splits."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from client.data.errors import SiteError, SitesFolderError
from client.data.files import site_folders
from client.data.site import Site, discover, load_site
from client.data.siteconfig import SiteConfig, load_site_config
from client.data.split import explicit_split, split_subjects
from tests.conftest import DATA

COLIN = DATA / "mri" / "colin27_t1_1mm.nii.gz"


def _hu_volume(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(40.0, 300.0, shape).astype(np.float32)


def _skipped_reasons(site: Site) -> dict[str, str]:
    return {Path(item.path).name: item.reason for item in site.skipped}


def test_mixed_ct_site_loads_good_scans_and_skips_bad_files_with_reasons(tmp_path, make):
    site_dir = tmp_path / "st-mary"
    one = make.series(site_dir / "patient1" / "series1", make.stored((32, 28, 6), seed=1))
    two = make.series(site_dir / "patient2", make.stored((24, 24, 5), seed=2), prefix="a", seed=7)
    three = make.series(site_dir / "patient2", make.stored((20, 30, 4), seed=3), prefix="b", seed=8)
    make.nifti(site_dir / "nifti" / "head1.nii.gz", _hu_volume((30, 30, 10), 0))
    make.nifti(site_dir / "head2.nii", _hu_volume((30, 26, 8), 1))
    bad = {
        "nan.nii.gz": "NaN or infinite",
        "constant.nii.gz": "constant volume",
        "flat.nii.gz": "2D image",
        "tiny.nii.gz": "smaller than the 16x16",
        "notes.txt": "neither a DICOM file nor a NIfTI file",
        "corrupt.dcm": "without image data",
        "truncated.dcm": "truncated",
    }
    with_nan = _hu_volume((20, 20, 4), 2)
    with_nan[3, 4, 1] = np.nan
    make.nifti(site_dir / "nan.nii.gz", with_nan)
    make.nifti(site_dir / "constant.nii.gz", np.full((20, 20, 4), 5.0, np.float32))
    make.nifti(site_dir / "flat.nii.gz", _hu_volume((40, 40), 3))
    make.nifti(site_dir / "tiny.nii.gz", _hu_volume((8, 8, 8), 4))
    (site_dir / "notes.txt").write_text("acquired on the old scanner\n")
    (site_dir / "patient2" / "corrupt.dcm").write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 8)
    (site_dir / "patient1" / "truncated.dcm").write_bytes(one.files[0].read_bytes()[:-300])
    one.files[0].rename(one.files[0].with_name("zz.dcm"))  # the intact copy stays, under a new name
    (site_dir / "README.md").write_text("# scans of St Mary\n")
    (site_dir / ".DS_Store").write_bytes(b"\0\1\2")
    (site_dir / ".cache").mkdir()
    (site_dir / ".cache" / "junk.dcm").write_bytes(b"junk")

    site = load_site(site_dir)

    assert (site.config.name, site.config.modality, site.config.modality_source) == ("st-mary", "CT", "dicom")
    subjects = {scan.volume.subject for scan in site.scans}
    assert subjects == {one.uid, two.uid, three.uid, "nifti/head1", "head2"}
    by_subject = {scan.volume.subject: scan for scan in site.scans}
    for written in (one, two, three):
        np.testing.assert_array_equal(by_subject[written.uid].volume.array, written.expected)
    assert _skipped_reasons(site).keys() == bad.keys()  # README, hidden files and folders ignored silently
    for name, problem in bad.items():
        assert problem in _skipped_reasons(site)[name]
    for scan in site.scans:
        assert scan.normalisation.kind == "ct-window" and scan.normalisation.lo == -160.0
        assert scan.image.dtype == np.float32 and scan.image.shape == scan.volume.array.shape  # whole scans
        assert 0.0 <= scan.image.min() and scan.image.max() <= 1.0
    in_splits = [scan.volume.subject for name in ("train", "val", "test") for scan in site.split(name)]
    assert sorted(in_splits) == sorted(subjects)  # each scan in exactly one split
    assert [len(site.split(name)) for name in ("train", "val", "test")] == [3, 1, 1]


def test_mr_site_with_site_toml_explicit_split_and_foreign_modality(tmp_path, make):
    site_dir = tmp_path / "site-b"
    site_dir.mkdir()
    (site_dir / "colin.nii.gz").symlink_to(COLIN)
    make.nifti(site_dir / "sub-02.nii.gz", np.random.default_rng(0).gamma(2.0, 50.0, (40, 40, 12)).astype(np.float32))
    make.nifti(site_dir / "sub-03.nii.gz", np.random.default_rng(1).gamma(2.0, 50.0, (40, 40, 12)).astype(np.float32))
    ct = make.series(site_dir / "ct", make.stored((20, 20, 4)))
    (site_dir / "site.toml").write_text(
        'name = "Hospital B"\nmodality = "mr"\nscanner = "Philips 1.5T"\n'
        '[acquisition]\nprofile = "mr-1.5t-kspace"\n'
        '[split]\nval = ["colin"]\ntest = ["sub-03"]\n'
        "[normalisation]\nmr_percentiles = [1.0, 99.0]\n"
    )
    site = load_site(site_dir)
    config = site.config
    assert (config.name, config.modality, config.modality_source) == ("Hospital B", "MR", "site.toml")
    assert config.scanner == "Philips 1.5T"
    assert config.acquisition == {"profile": "mr-1.5t-kspace"}
    assert {name: [s.volume.subject for s in site.split(name)] for name in ("train", "val", "test")} == {
        "train": ["sub-02"], "val": ["colin"], "test": ["sub-03"],
    }
    colin = site.split("val")[0]
    foreground = colin.volume.array[colin.volume.array > 0]
    assert (colin.normalisation.lo, colin.normalisation.hi) == pytest.approx(tuple(np.percentile(foreground, [1, 99])))
    (skipped,) = site.skipped
    assert skipped.path == f"{site_dir / 'ct'}#{ct.uid}"
    assert "modality CT differs from the site's (site.toml declares MR)" in skipped.reason


def test_discover_returns_volumes_and_skipped_without_config(tmp_path, make):
    make.nifti(tmp_path / "a.nii.gz", _hu_volume((20, 20, 5), 0))
    (tmp_path / "b.dcm").write_bytes(b"not dicom")
    volumes, skipped = discover(tmp_path)
    assert [v.subject for v in volumes] == ["a"] and volumes[0].modality == "MR"
    assert [Path(s.path).name for s in skipped] == ["b.dcm"]


def test_repeated_subject_id_is_skipped(tmp_path, make):
    make.nifti(tmp_path / "scan.nii", _hu_volume((20, 20, 5), 0))
    make.nifti(tmp_path / "scan.nii.gz", _hu_volume((20, 20, 5), 1))
    make.nifti(tmp_path / "other" / "scan.nii.gz", _hu_volume((20, 20, 5), 2))  # subject "other/scan": fine
    volumes, (skipped,) = discover(tmp_path)
    assert sorted(v.subject for v in volumes) == ["other/scan", "scan"]
    assert "subject id 'scan' is already used" in skipped.reason


def test_one_subject_site_is_both_train_and_val(tmp_path, make, caplog):
    make.nifti(tmp_path / "only.nii.gz", _hu_volume((20, 20, 5), 0))
    with caplog.at_level(logging.WARNING):
        site = load_site(tmp_path)
    assert [s.volume.subject for s in site.split("train")] == ["only"] == [s.volume.subject for s in site.split("val")]
    assert site.split("train")[0].image is site.split("val")[0].image
    assert "only one subject" in caplog.text
    with pytest.raises(ValueError, match="unknown split"):
        site.split("validation")


# --------------------------------------------------------------------------------------- unusable sites


def test_missing_folder(tmp_path):
    with pytest.raises(SiteError, match="does not exist") as caught:
        load_site(tmp_path / "nowhere")
    assert caught.value.path == str(tmp_path / "nowhere")
    with pytest.raises(SiteError, match="does not exist"):
        discover(tmp_path / "nowhere")


def test_file_instead_of_folder(tmp_path):
    (tmp_path / "scan.nii.gz").write_bytes(b"")
    with pytest.raises(SiteError, match="not a site folder"):
        load_site(tmp_path / "scan.nii.gz")


def test_empty_folder_even_with_readme_and_config(tmp_path):
    (tmp_path / "README.txt").write_text("nothing yet")
    (tmp_path / "site.toml").write_text('name = "x"\n')
    with pytest.raises(SiteError, match="site folder is empty") as caught:
        load_site(tmp_path)
    assert str(tmp_path) in str(caught.value) and "NIfTI" in caught.value.hint


def test_folder_with_only_bad_files_names_them(tmp_path, make):
    (tmp_path / "a.txt").write_text("hello")
    make.nifti(tmp_path / "b.nii.gz", np.zeros((20, 20, 5), np.float32))
    with pytest.raises(SiteError, match="no usable scan") as caught:
        load_site(tmp_path)
    message = str(caught.value)
    assert message.startswith(str(tmp_path)) and "a.txt" in message and "b.nii.gz" in message
    assert "constant volume" in message


# -------------------------------------------------------------------------------------------- site.toml


def test_defaults_without_site_toml(tmp_path):
    config = load_site_config(tmp_path)
    assert config == SiteConfig(name=tmp_path.name)
    assert (config.modality, config.supervision) == ("MR", "paired")
    assert (config.split_seed, config.split_fractions, config.split_subjects) == (0, (0.6, 0.2, 0.2), None)
    assert config.ct_window == (-160.0, 240.0) and config.mr_percentiles == (0.5, 99.5)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('modaility = "MR"\n', "unknown key 'modaility'"),
        ("[split]\nsed = 3\n", "unknown key 'sed' in [split]"),
        ("[normalisation]\nwindow = [0, 1]\n", "unknown key 'window' in [normalisation]"),
        ('name = "unclosed\n', "is not valid TOML"),
        ('modality = "PET"\n', "modality 'PET' is not supported"),
        ("supervision = 1\n", "supervision must be a string"),
        ("[split]\nseed = true\n", "seed must be an integer"),
        ("[split]\nfractions = [0.5, 0.2, 0.2]\n", "summing to 1"),
        ('[split]\nfractions = [0.6, 0.2, 0.2]\ntest = ["a"]\n', "both fractions and subject lists"),
        ('[split]\nval = ["a"]\ntest = ["a"]\n', "subject 'a' is in both val and test"),
        ("[normalisation]\nct_window = [240, -160]\n", "two increasing numbers"),
        ('acquisition = "mr-3t"\n', "acquisition must be a table"),
    ],
)
def test_bad_site_toml_names_the_file_and_the_problem(tmp_path, text, problem):
    (tmp_path / "site.toml").write_text(text)
    with pytest.raises(SiteError) as caught:
        load_site_config(tmp_path)
    assert caught.value.path == str(tmp_path / "site.toml")
    assert problem in caught.value.problem


@pytest.mark.parametrize(
    ("text", "key", "why"),
    [
        ("[privacy]\nepsilon = 8.0\n", "[privacy]", "differential privacy is not built yet"),
        ("share_previews = false\n", "share_previews", "nothing leaves a site but weights and numbers"),
    ],
)
def test_site_toml_keys_of_features_not_built_are_refused(tmp_path, text, key, why):
    (tmp_path / "site.toml").write_text(f'name = "a"\n{text}')
    with pytest.raises(SiteError) as caught:
        load_site_config(tmp_path)
    assert caught.value.path == str(tmp_path / "site.toml")
    assert f"{key} is not available" in caught.value.problem and why in caught.value.problem
    assert caught.value.hint.startswith(f"remove {key}")


def test_bad_site_toml_stops_load_site(tmp_path, make):
    make.nifti(tmp_path / "a.nii.gz", _hu_volume((20, 20, 5), 0))
    (tmp_path / "site.toml").write_text("colour = 1\n")
    with pytest.raises(SiteError, match="site.toml: unknown key 'colour'"):
        load_site(tmp_path)


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ('[acquisition]\nprofile = "mr-3t-kspace"\nnoise_levl = 0.1\n', "noise_levl"),
        ('[acquisition]\nprofile = "ct-standard"\n', "is for CT but the site's modality is MR"),
    ],
)
def test_a_bad_acquisition_table_stops_the_site_when_it_loads(tmp_path, make, table, words):
    make.nifti(tmp_path / "a.nii.gz", _hu_volume((20, 20, 5), 0))
    (tmp_path / "site.toml").write_text(table)
    with pytest.raises(SiteError) as caught:
        load_site(tmp_path)  # what `fedsr sites check` does: the typo shows before any training
    assert caught.value.path == str(tmp_path / "site.toml")
    assert "[acquisition]" in caught.value.problem and words in caught.value.problem


# ------------------------------------------------------------------------------------------ site folders


def test_site_folders_are_the_visible_sub_folders_sorted_by_name(tmp_path):
    for name in ("site-b", "Site-C", "site-a", ".fedsr-state", ".hidden-site"):
        (tmp_path / name).mkdir()
    (tmp_path / "notes.txt").write_text("not a site")
    (tmp_path / ".DS_Store").write_text("")
    assert site_folders(tmp_path) == [str(tmp_path / name) for name in ("Site-C", "site-a", "site-b")]
    assert site_folders(str(tmp_path)) == site_folders(tmp_path)


def test_site_folders_refuses_a_missing_file_or_empty_sites_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".hidden").mkdir()
    (tmp_path / "file").write_text("")
    for path, problem in [
        (tmp_path / "missing", "does not exist"),
        (tmp_path / "file", "is a file"),
        (tmp_path / "empty", "holds no site sub-folder"),
    ]:
        with pytest.raises(SitesFolderError) as caught:
            site_folders(path)
        assert isinstance(caught.value, FileNotFoundError)
        assert caught.value.path == str(path) and problem in caught.value.problem
        assert "one sub-folder per site" in caught.value.hint


# -------------------------------------------------------------------------------------------- splitting


def test_split_is_deterministic_by_subject_and_disjoint():
    subjects = [f"sub-{i:02d}" for i in range(10)]
    first = split_subjects(subjects, (0.6, 0.2, 0.2), seed=3)
    assert first == split_subjects(list(reversed(subjects)), (0.6, 0.2, 0.2), seed=3)
    assert [len(first[name]) for name in ("train", "val", "test")] == [6, 2, 2]
    assert sorted(first["train"] + first["val"] + first["test"]) == subjects
    others = [split_subjects(subjects, (0.6, 0.2, 0.2), seed=s) for s in range(4, 9)]
    assert any(other != first for other in others)


@pytest.mark.parametrize(
    ("n", "fractions", "sizes"),
    [
        (2, (0.6, 0.2, 0.2), (1, 1, 0)),
        (3, (0.6, 0.2, 0.2), (1, 1, 1)),
        (5, (0.6, 0.2, 0.2), (3, 1, 1)),
        (4, (0.0, 0.5, 0.5), (1, 2, 1)),
        (5, (0.0, 1.0, 0.0), (1, 4, 0)),
        (0, (0.6, 0.2, 0.2), (0, 0, 0)),
    ],
)
def test_split_sizes_keep_one_train_and_one_val(n, fractions, sizes):
    parts = split_subjects([f"s{i}" for i in range(n)], fractions, seed=0)
    assert tuple(len(parts[name]) for name in ("train", "val", "test")) == sizes


def test_split_refuses_repeated_subjects():
    with pytest.raises(ValueError, match="unique"):
        split_subjects(["a", "a", "b"])


def test_explicit_split_sends_unlisted_subjects_to_train(caplog):
    with caplog.at_level(logging.WARNING):
        parts = explicit_split(["a", "b", "c", "d"], {"val": ["b"], "test": ["d", "ghost"]})
    assert parts == {"train": ["a", "c"], "val": ["b"], "test": ["d"]}
    assert "ghost" in caplog.text
