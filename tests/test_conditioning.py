"""Scanner-aware SR (``condition = "acquisition"``): a FiLM of one feature map per family, from the site's acquisition
description. The conditioned model starts as the blind one, learns to answer two descriptions differently, travels
its FiLM weights, round-trips through a checkpoint; a site's description comes from its profile or its DICOM headers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F

from client.acquisition import DEFAULTS, dicom_description, kernel_sharpness, profile_description, site_acquisition
from client.degrade import PRESETS
from client.paired import paired_for
from client.pairs import prepare_site
from shared_models.checkpoint import load_checkpoint, save_checkpoint
from shared_models.conditioning import (
    ACQUISITION_FIELDS,
    FILM_NAME,
    MAX_NORMALISED,
    acquisition_vector,
    conditioning_summary,
    set_acquisition,
)
from shared_models.registry import build_model, families, family, model_spec
from simulation.phantoms import write_phantom_sites

pytestmark = pytest.mark.usefixtures("one_thread")

THREE_TESLA = {"field_strength_t": 3.0, "slice_thickness_mm": 1.0, "kernel_sharpness": 1.0, "noise_level": 0.01}
LOW_FIELD = {"field_strength_t": 0.5, "slice_thickness_mm": 5.0, "kernel_sharpness": 0.3, "noise_level": 0.05}


def _pair(name: str, seed: int = 0, **options):
    """The blind model and the conditioned one, built from the same seed."""
    torch.manual_seed(seed)
    blind = build_model(name, preset="tiny")
    torch.manual_seed(seed)
    return blind, build_model(name, preset="tiny", condition="acquisition", **options)


@pytest.mark.parametrize("name", sorted(families()))
def test_a_conditioned_model_starts_as_the_blind_one(name: str) -> None:
    blind, conditioned = _pair(name)
    for key, value in blind.state_dict().items():
        torch.testing.assert_close(conditioned.state_dict()[key], value, rtol=0, atol=0)
    film = {k for k in conditioned.state_dict() if FILM_NAME in k}
    assert film and set(conditioned.state_dict()) - set(blind.state_dict()) == film
    assert film <= set(family(name).shared_state(conditioned, None))  # the FiLM's weights travel
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        for description in (THREE_TESLA, LOW_FIELD):
            set_acquisition(conditioned, description)
            assert torch.equal(conditioned(x), blind(x))


def test_two_acquisitions_give_different_outputs_after_training(mr_patch_pair) -> None:
    lr, hr = mr_patch_pair
    torch.manual_seed(0)
    # without the global residual's zero-initialised last conv, the FiLM (also starting at zero) acts after one step
    model = build_model("srcnn", preset="tiny", global_residual=False, condition="acquisition")
    set_acquisition(model, THREE_TESLA)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(5):
        optimiser.zero_grad()
        F.l1_loss(model(lr), hr).backward()
        optimiser.step()
    with torch.no_grad():
        trained_for = model(lr)
        set_acquisition(model, LOW_FIELD)
        other = model(lr)
    assert (trained_for - other).abs().max() > 1e-4  # exactly 0 before training (the test above)


def test_a_conditioned_checkpoint_round_trips_and_needs_a_description(tmp_path: Path) -> None:
    _, model = _pair("edsr", personal="head")
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if FILM_NAME in key:
                tensor.normal_(0.0, 0.1)  # a trained FiLM, not the identity it starts as
    path = save_checkpoint(tmp_path / "conditioned.pt", model, scale=2)
    loaded, meta = load_checkpoint(path)
    assert meta["model"] == model_spec(model) and meta["model"]["params"]["condition"] == "acquisition"
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    x = torch.rand(1, 1, 12, 12)
    with pytest.raises(RuntimeError, match="set_acquisition"):
        loaded(x)
    model.eval()
    with torch.no_grad():
        for description in (THREE_TESLA, LOW_FIELD):
            set_acquisition(model, description)
            set_acquisition(loaded, description)
            torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_the_vector_is_each_value_over_its_scale_and_bad_descriptions_are_refused() -> None:
    vector = acquisition_vector(LOW_FIELD)
    expected = [min(LOW_FIELD[f.name] / f.scale, MAX_NORMALISED) for f in ACQUISITION_FIELDS]
    torch.testing.assert_close(vector, torch.tensor(expected))
    assert acquisition_vector({**LOW_FIELD, "field_strength_t": 70.0})[0] == MAX_NORMALISED
    with pytest.raises(ValueError, match="missing"):
        acquisition_vector({k: v for k, v in LOW_FIELD.items() if k != "noise_level"})
    with pytest.raises(ValueError, match="slice_thickness_mm"):
        acquisition_vector({**LOW_FIELD, "slice_thickness_mm": -1.0})
    with pytest.raises(ValueError, match="not conditioned"):
        set_acquisition(build_model("srcnn", preset="tiny"), LOW_FIELD)


def test_the_report_summary_names_the_feature_map() -> None:
    _, model = _pair("gan")
    summary = conditioning_summary(model)
    assert summary["feature_maps"] == [family("gan").conditioned]
    assert summary["film_parameters"] == sum(v.numel() for k, v in model.state_dict().items() if FILM_NAME in k)
    assert conditioning_summary(build_model("gan", preset="tiny")) is None


# -------------------------------------------------------------------------------------------- the site's side


def test_a_profile_describes_field_kernel_thickness_and_noise() -> None:
    profile = dataclasses.replace(PRESETS["mr-1.5t-kspace"], kspace_window="none")
    described = profile_description(profile)
    assert described == {"field_strength_t": 1.5, "slice_thickness_mm": profile.slice_thickness_mm,
                         "kernel_sharpness": profile.kspace_fraction, "noise_level": profile.noise_level}
    psf = PRESETS["mr-psf"]
    assert profile_description(psf)["field_strength_t"] is None  # the preset's name says nothing ...
    assert profile_description(psf, "Philips Ingenia 3T")["field_strength_t"] == 3.0  # ... the scanner's does
    assert profile_description(psf)["kernel_sharpness"] == 1 / (1 + psf.psf_fwhm_lr_px)
    assert profile_description(PRESETS["ct-standard"])["field_strength_t"] == 0.0
    assert kernel_sharpness("B30f") == 0.3 and kernel_sharpness("BONE") > kernel_sharpness("SOFT")
    assert kernel_sharpness("FC") is None


@pytest.fixture(scope="module")
def phantom_site(tmp_path_factory):
    (site_dir,) = write_phantom_sites(tmp_path_factory.mktemp("sites"), n_sites=1, subjects_per_site=3,
                                      shape=(32, 32, 16))
    return prepare_site(str(site_dir), 2, paired_for(2))


def test_a_site_without_a_profile_is_described_by_its_dicom_headers(phantom_site, make, tmp_path: Path) -> None:
    written = make.series(tmp_path / "dicom", np.zeros((8, 8, 3), np.int16), modality="MR")
    for i, path in enumerate(written.files):
        ds = pydicom.dcmread(path)
        ds.MagneticFieldStrength, ds.SliceThickness, ds.ConvolutionKernel = 1.5, 4.0 + i, "B45f"
        ds.save_as(path)
    assert dicom_description(str(tmp_path / "dicom")) == {"field_strength_t": 1.5, "slice_thickness_mm": 5.0,
                                                         "kernel_sharpness": 0.45}
    profile = profile_description(phantom_site.profile, phantom_site.config.scanner)
    assert site_acquisition(phantom_site) == {**{k: v for k, v in profile.items() if v is not None},
                                              **{k: v for k, v in DEFAULTS.items() if profile[k] is None}}
    # the same site with its scans in DICOM: with its [acquisition] table the profile wins, without it the headers
    dicom_site = dataclasses.replace(phantom_site, directory=tmp_path / "dicom")
    assert site_acquisition(dicom_site)["field_strength_t"] == profile["field_strength_t"] == 3.0
    no_profile = dataclasses.replace(dicom_site, config=dataclasses.replace(phantom_site.config, acquisition={}))
    described = site_acquisition(no_profile)
    assert (described["field_strength_t"], described["slice_thickness_mm"], described["kernel_sharpness"]) == \
        (1.5, 5.0, 0.45)
    assert described["noise_level"] == profile["noise_level"]  # no header has it: the profile's
