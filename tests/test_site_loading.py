"""Site folders: discovery, skipping bad files with reasons, site.toml, normalisation and subject-level splits."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from rich.console import Console

from client.data.errors import SiteError, SitesFolderError
from client.data.files import site_folders
from client.data.site import Site, discover, load_site
from client.data.siteconfig import SiteConfig, load_site_config
from client.data.split import explicit_split, split_subjects
from client.sites_report import check_site_folder, print_site_report
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
    # The writer gives every series PatientID "TEST": the three series are one patient, in one split.
    assert len({by_subject[written.uid].split for written in (one, two, three)}) == 1
    assert [site.split_counts()[name]["patients"] for name in ("train", "val", "test")] == [1, 1, 1]


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
    # no site.toml, no DICOM series: the modality comes from the intensities (HU-like values: CT)
    assert [v.subject for v in volumes] == ["a"] and volumes[0].modality == "CT"
    assert [Path(s.path).name for s in skipped] == ["b.dcm"]


def test_repeated_subject_id_is_skipped(tmp_path, make):
    make.nifti(tmp_path / "scan.nii", _hu_volume((20, 20, 5), 0))
    make.nifti(tmp_path / "scan.nii.gz", _hu_volume((20, 20, 5), 1))
    make.nifti(tmp_path / "other" / "scan.nii.gz", _hu_volume((20, 20, 5), 2))  # subject "other/scan": fine
    volumes, (skipped,) = discover(tmp_path)
    assert sorted(v.subject for v in volumes) == ["other/scan", "scan"]
    assert "subject id 'scan' is already used" in skipped.reason


def test_one_patient_site_is_both_train_and_val(tmp_path, make, caplog):
    make.nifti(tmp_path / "only.nii.gz", _hu_volume((20, 20, 5), 0))
    with caplog.at_level(logging.WARNING):
        site = load_site(tmp_path)
    assert [s.volume.subject for s in site.split("train")] == ["only"] == [s.volume.subject for s in site.split("val")]
    assert site.split("train")[0].image is site.split("val")[0].image
    assert "only one patient" in caplog.text
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
    assert (config.share_local_model, config.share_previews, config.subject_map) == (False, False, {})


@pytest.mark.parametrize(
    ("text", "local_model", "previews"),
    [
        ("share_local_model = true\nshare_previews = true\n", True, True),
        ("share_previews = true\n", False, True),
        ("share_local_model = true\nshare_previews = false\n", True, False),
    ],
)
def test_consent_keys_parse_as_booleans(tmp_path, text, local_model, previews):
    (tmp_path / "site.toml").write_text(text)
    config = load_site_config(tmp_path)
    assert (config.share_local_model, config.share_previews) == (local_model, previews)


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
        ('[split]\nval = ["a"]\ntest = ["a"]\n', "patient 'a' is in both val and test"),
        ("[normalisation]\nct_window = [240, -160]\n", "two increasing numbers"),
        ('acquisition = "mr-3t"\n', "acquisition must be a table"),
        ('share_local_model = "yes"\n', "share_local_model must be true or false"),
        ("share_previews = 1\n", "share_previews must be true or false"),
        ('subject = "sub-01"\n', "subject must be a table"),
        ('[subject]\n"sub-01/anat/sub-01_T1w" = 1\n', "[subject] 'sub-01/anat/sub-01_T1w' must map to a patient id"),
        ('[subject]\n"a" = ""\n', "[subject] 'a' must map to a patient id"),
    ],
)
def test_bad_site_toml_names_the_file_and_the_problem(tmp_path, text, problem):
    (tmp_path / "site.toml").write_text(text)
    with pytest.raises(SiteError) as caught:
        load_site_config(tmp_path)
    assert caught.value.path == str(tmp_path / "site.toml")
    assert problem in caught.value.problem


def test_site_toml_privacy_table_is_read_and_checked(tmp_path):
    (tmp_path / "site.toml").write_text('name = "a"\n[privacy]\nepsilon_budget = 4\ndelta = 1e-6\n')
    privacy = load_site_config(tmp_path).privacy
    assert (privacy.required, privacy.epsilon_budget, privacy.delta, privacy.dp_required) == (False, 4.0, 1e-6, True)
    assert not load_site_config(tmp_path / "absent").privacy.dp_required
    for text, problem in [("epsilon = 8.0", "unknown key 'epsilon' in [privacy]"),
                          ("epsilon_budget = -1", "epsilon_budget must be a positive number"),
                          ("delta = 2", "delta must be a number in (0, 1)"),
                          ('required = "yes"', "required")]:
        (tmp_path / "site.toml").write_text(f'name = "a"\n[privacy]\n{text}\n')
        with pytest.raises(SiteError) as caught:
            load_site_config(tmp_path)
        assert caught.value.path == str(tmp_path / "site.toml")
        assert problem in caught.value.problem, caught.value.problem


def test_bad_site_toml_stops_load_site(tmp_path, make):
    make.nifti(tmp_path / "a.nii.gz", _hu_volume((20, 20, 5), 0))
    (tmp_path / "site.toml").write_text("colour = 1\n")
    with pytest.raises(SiteError, match="site.toml: unknown key 'colour'"):
        load_site(tmp_path)


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ('[acquisition]\nprofile = "mr-3t-kspace"\nnoise_levl = 0.1\n', "noise_levl"),
        ('modality = "MR"\n[acquisition]\nprofile = "ct-standard"\n', "is for CT but the site's modality is MR"),
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


# ---------------------------------------------------------------------------------------------- patients


def _set_patient_id(series, patient_id: str | None) -> None:
    """Rewrite the PatientID of every file of a written series (None: remove the tag)."""
    for path in series.files:
        ds = pydicom.dcmread(path)
        if patient_id is None:
            del ds.PatientID
        else:
            ds.PatientID = patient_id
        ds.save_as(path, enforce_file_format=True)


def _patients_by_split(site: Site) -> dict[str, set[str]]:
    """Every patient -> the splits its scans are in."""
    found: dict[str, set[str]] = {}
    for scan in site.scans:
        found.setdefault(scan.volume.patient, set()).add(scan.split)
    return found


def test_every_series_of_a_dicom_patient_lands_in_its_patients_split_for_every_seed(tmp_path, make, caplog):
    site_dir = tmp_path / "st-luke"
    series_per_patient = {"PAT-A": 2, "PAT-B": 2, "PAT-C": 1, "PAT-D": 1, "PAT-E": 1}
    patient_of_series = {}
    for k, (patient, count) in enumerate(sorted(series_per_patient.items())):
        for j in range(count):
            written = make.series(site_dir / f"p{k}" / f"s{j}", make.stored((20, 20, 3), seed=10 * k + j))
            _set_patient_id(written, patient)
            patient_of_series[written.uid] = patient
    splits_of_a = set()
    for seed in range(6):
        (site_dir / "site.toml").write_text(f"[split]\nseed = {seed}\n")
        with caplog.at_level(logging.DEBUG):
            site = load_site(site_dir)
        assert {scan.volume.subject: scan.volume.patient for scan in site.scans} == patient_of_series
        by_patient = _patients_by_split(site)
        assert all(len(splits) == 1 for splits in by_patient.values()), (seed, by_patient)
        counts = site.split_counts()
        assert [counts[name]["patients"] for name in ("train", "val", "test")] == [3, 1, 1]
        assert sum(c["scans"] for c in counts.values()) == len(patient_of_series)
        splits_of_a |= by_patient["PAT-A"]
    assert len(splits_of_a) > 1  # the seeds do move the patient: the check above is not vacuous
    assert "PAT-" not in caplog.text  # PatientIDs are never logged, at any level


def test_split_lists_name_dicom_patients_not_their_series(tmp_path, make):
    a1, a2, b, c = (make.series(tmp_path / f"s{k}", make.stored((20, 20, 3), seed=k)) for k in range(4))
    for written, patient in ((a1, "PAT-A"), (a2, "PAT-A"), (b, "PAT-B"), (c, "PAT-C")):
        _set_patient_id(written, patient)
    (tmp_path / "site.toml").write_text('[split]\ntest = ["PAT-A"]\nval = ["PAT-B"]\n')
    site = load_site(tmp_path)
    assert sorted(scan.volume.subject for scan in site.split("test")) == sorted([a1.uid, a2.uid])
    (tmp_path / "site.toml").write_text(f'[split]\ntest = ["{a1.uid}"]\n')
    with pytest.raises(SiteError) as caught:
        load_site(tmp_path)
    assert caught.value.path == str(tmp_path / "site.toml")
    assert f"[split] test lists the scan '{a1.uid}', not its patient" in caught.value.problem
    assert "the lists name patients" in caught.value.problem
    assert "DICOM PatientID" in caught.value.hint and "PAT-A" not in str(caught.value)  # the id stays on site


def test_a_dicom_series_without_patient_id_is_its_own_patient(tmp_path, make):
    named = make.series(tmp_path / "a", make.stored((20, 20, 3), seed=1))
    _set_patient_id(named, "PAT-A")
    empty = make.series(tmp_path / "b", make.stored((20, 20, 3), seed=2))
    _set_patient_id(empty, "  ")
    missing = make.series(tmp_path / "c", make.stored((20, 20, 3), seed=3))
    _set_patient_id(missing, None)
    volumes, skipped = discover(tmp_path)
    assert skipped == []
    patients = {v.subject: v.patient for v in volumes}
    assert patients == {named.uid: "PAT-A", empty.uid: empty.uid, missing.uid: missing.uid}


def test_subject_table_groups_nifti_scans_and_warns_of_keys_naming_no_scan(tmp_path, make, caplog):
    for k, name in enumerate(("scans/a1", "scans/a2", "b", "c", "d")):
        make.nifti(tmp_path / f"{name}.nii.gz", _hu_volume((20, 20, 4), k))
    mapping = '[subject]\n"scans/a1" = "alice"\n"scans/a2" = "alice"\n"scans/gone.nii.gz" = "bob"\n'
    splits_of_alice = set()
    for seed in range(6):
        (tmp_path / "site.toml").write_text(f"{mapping}[split]\nseed = {seed}\n")
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            site = load_site(tmp_path)
        assert site.config.subject_map == {"scans/a1": "alice", "scans/a2": "alice", "scans/gone.nii.gz": "bob"}
        by_patient = _patients_by_split(site)
        assert sorted(by_patient) == ["alice", "b", "c", "d"]
        assert all(len(splits) == 1 for splits in by_patient.values()), (seed, by_patient)
        splits_of_alice |= by_patient["alice"]
        warning = next(r.getMessage() for r in caplog.records if "[subject]" in r.getMessage())
        assert str(tmp_path / "site.toml") in warning and "scans/gone.nii.gz" in warning and "alice" not in warning
    assert len(splits_of_alice) > 1

    (tmp_path / "site.toml").write_text(f'{mapping}[split]\nval = ["alice"]\ntest = ["b"]\n')
    site = load_site(tmp_path)
    assert sorted(scan.volume.subject for scan in site.split("val")) == ["scans/a1", "scans/a2"]
    (tmp_path / "site.toml").write_text(f'{mapping}[split]\nval = ["scans/a1"]\n')
    with pytest.raises(SiteError) as caught:
        load_site(tmp_path)
    assert caught.value.path == str(tmp_path / "site.toml")
    assert "[split] val lists the scan 'scans/a1', not its patient" in caught.value.problem
    assert caught.value.hint == "list 'alice' instead of 'scans/a1'"


def test_bids_folders_and_file_prefixes_group_scans_by_subject_label(tmp_path, make):
    patients = {
        "sub-01/anat/sub-01_run-1_T1w": "sub-01",
        "sub-01/anat/sub-01_run-2_T1w": "sub-01",
        "sub-02/ses-1/anat/sub-02_ses-1_T1w": "sub-02",
        "sub-02/ses-2/anat/sub-02_ses-2_T1w": "sub-02",
        "sub-03_T1w": "sub-03",
        "sub-03_T2w": "sub-03",
        "sub-04/anat/sub-04_T1w": "sub-01",  # site.toml's [subject] wins over the folder
        "head1": "head1",
    }
    for k, scan in enumerate(patients):
        make.nifti(tmp_path / f"{scan}.nii.gz", _hu_volume((20, 20, 4), k))
    (tmp_path / "site.toml").write_text('[subject]\n"sub-04/anat/sub-04_T1w" = "sub-01"\n')
    site = load_site(tmp_path)
    assert {scan.volume.subject: scan.volume.patient for scan in site.scans} == patients
    assert all(len(splits) == 1 for splits in _patients_by_split(site).values())
    assert sum(c["patients"] for c in site.split_counts().values()) == len(set(patients.values()))


@pytest.mark.parametrize(
    ("scans", "toml", "counts", "note"),
    [
        (["sub-01_run-1", "sub-01_run-2"], "", [(2, 1), (2, 1), (0, 0)],
         "1 patient: a site needs at least 3 patients to hold out a test split"),
        (["sub-01", "sub-02"], "", [(1, 1), (1, 1), (0, 0)],
         "2 patients: a site needs at least 3 patients to hold out a test split"),
        (["sub-01", "sub-02", "sub-03"], "", [(1, 1), (1, 1), (1, 1)],
         "only 1 test scan: an interval needs at least 3"),
        (["sub-01", "sub-02", "sub-03", "sub-04"], "[split]\nfractions = [0.5, 0.5, 0.0]\n", [(2, 2), (2, 2), (0, 0)],
         "no test scans: the [split] of site.toml holds out no patient for testing"),
        ([f"sub-0{p}_run-{r}" for p in (1, 2, 3) for r in (1, 2, 3)], "", [(3, 1), (3, 1), (3, 1)], None),
    ],
)
def test_split_counts_and_test_note_by_number_of_patients(tmp_path, make, scans, toml, counts, note):
    for k, scan in enumerate(scans):
        make.nifti(tmp_path / f"{scan}.nii.gz", _hu_volume((20, 20, 4), k))
    (tmp_path / "site.toml").write_text(toml)
    site = load_site(tmp_path)
    found = site.split_counts()
    assert [(found[name]["scans"], found[name]["patients"]) for name in ("train", "val", "test")] == counts
    assert site.test_note() == note


def test_sites_check_shows_patients_per_split_and_the_test_note_but_no_patient_id(tmp_path, make):
    for k, patient in enumerate(("PAT-A", "PAT-A", "PAT-B")):
        _set_patient_id(make.series(tmp_path / f"s{k}", make.stored((20, 20, 3), seed=k)), patient)
    make.nifti(tmp_path / "sub-07" / "anat" / "sub-07_T1w.nii.gz", _hu_volume((20, 20, 4), 0))
    (tmp_path / "site.toml").write_text('share_previews = true\n[split]\ntest = ["PAT-A"]\nval = ["sub-07"]\n')
    console = Console(width=250, record=True)
    assert print_site_report(console, check_site_folder(tmp_path))
    out = console.export_text()
    site = load_site(tmp_path)
    counts = ", ".join(f"{c['scans']} ({c['patients']}) {name}" for name, c in site.split_counts().items())
    assert counts == "1 (1) train, 1 (1) val, 2 (1) test"
    assert f"scans (patients): {counts}" in out
    assert f"test split: {site.test_note()}" in out and "only 2 test scans" in out
    assert "DICOM patient 1" in out and "DICOM patient 2" in out and "sub-07" in out and "PAT-" not in out
    assert "may share its local model: no, test previews: yes" in out
