"""``fedsr infer``: bounded-memory streaming, safety (no partial or overwritten outputs), refusals of a model that does
not fit a scan, batch mode (issue 11, parts 1, 2, 4, 5), and the model options: conditioned and personalised models
(issue 10)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from client.inference.errors import InferenceError
from client.inference.model import RUN_MODEL, load_model
from client.inference.resample import interpolate_slab
from client.inference.run import InferOptions, infer_scan
from client.inference.scans import read_scan, single_source
from client.personal import STATE_FORMAT, STATE_VERSION, body_fingerprint, head_path
from client.state import save_state_atomic
from server.checkpoint import FINAL
from shared_models.checkpoint import save_checkpoint
from shared_models.cli import app
from shared_models.conditioning import acquisition_vector, films
from shared_models.inference import InferencePlan, iter_super_resolve, plan_inference
from shared_models.registry import build_model, model_spec, personal_keys

CT = {"modality": "CT", "kind": "ct-window", "range": [-160.0, 240.0]}
MR = {"modality": "MR", "kind": "mr-percentile", "range": [0.5, 99.5]}


def perturbed(model: nn.Module, amount: float = 0.05) -> nn.Module:
    """Weights moved off their initial values (an untrained global-residual model is plain interpolation)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(amount * torch.randn(parameter.shape, generator=generator))
    return model


def checkpoint(path: Path, rules: dict | None = None, *, perturb: bool = False, **params) -> Path:
    torch.manual_seed(0)
    model = build_model(params.pop("family", "edsr"), **{"preset": "tiny", "width": 8, "scale": 2, **params})
    return save_checkpoint(path, perturbed(model) if perturb else model, scale=2,
                           normalisation={"site-a": CT} if rules is None else rules)


def ct_nifti(path: Path, shape: tuple[int, int, int] = (20, 18, 6), *, dtype=np.int16,
             spacing: tuple[float, float, float] = (0.8, 0.8, 3.0), seed: int = 0) -> Path:
    """A CT-like NIfTI (HU: soft tissue, some air and bone)."""
    rng = np.random.default_rng(seed)
    hu = rng.normal(40, 30, shape)
    hu[:3] = -1000
    hu[-3:, -3:] = 1200
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(hu.astype(dtype), np.diag([*spacing, 1.0])), path)
    return path


def invoke(*args: str):
    return CliRunner().invoke(app, ["infer", *map(str, args)], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})


# ------------------------------------------------------------------------------------------------ streaming


def test_streamed_tiles_and_slice_batches_agree_with_one_untiled_pass(one_thread):
    """3D: slabs of 24^3 tiles (overlap 16: a discarded margin of 4 LR voxels covers this model's receptive field)
    equal one tile over the whole volume; 2D: batches of 1 slice equal one batch of all."""
    rng = np.random.default_rng(1)
    volume = rng.random((30, 28, 40), dtype=np.float32)
    model3d = perturbed(build_model("edsr", spatial_dims=3, n_blocks=0, width=4, scale=2))
    tiled = list(iter_super_resolve(model3d, volume, plan=InferencePlan(tile=24, overlap=16, tile_batch_size=3)))
    whole = list(iter_super_resolve(model3d, volume, plan=InferencePlan(tile=64, overlap=16)))
    assert len(tiled) > 1 and len(whole) == 1 and [z0 for z0, _ in tiled] == sorted(z0 for z0, _ in tiled)
    np.testing.assert_allclose(np.concatenate([b for _, b in tiled], axis=2), whole[0][1], rtol=0, atol=1e-4)
    with torch.no_grad():
        direct = model3d(torch.from_numpy(volume)[None, None]).clamp(0, 1)[0, 0].numpy()
    np.testing.assert_allclose(whole[0][1], direct, rtol=0, atol=1e-5)

    model2d = perturbed(build_model("srcnn", preset="tiny", scale=2))
    one = list(iter_super_resolve(model2d, volume[:16, :16, :5], plan=InferencePlan(batch_size=1)))
    five = list(iter_super_resolve(model2d, volume[:16, :16, :5], plan=InferencePlan(batch_size=5)))
    assert [z0 for z0, _ in one] == [0, 1, 2, 3, 4] and len(five) == 1
    np.testing.assert_allclose(np.concatenate([b for _, b in one], axis=2), five[0][1], rtol=0, atol=1e-5)


def test_the_interpolation_slab_by_slab_equals_the_whole_volume_at_once():
    """In-plane, through-plane and both: each slab (with its margin) gives exactly the whole volume's values."""
    volume = np.random.default_rng(2).random((10, 12, 9), dtype=np.float32)
    planes = torch.from_numpy(np.moveaxis(volume, 2, 0)[:, None].copy())
    for shape in [(20, 24, 9), (10, 12, 18), (20, 24, 27)]:
        whole = F.interpolate(planes, size=shape[:2], mode="bicubic", align_corners=False)[:, 0].permute(1, 2, 0)
        whole = F.interpolate(whole[:, None], size=shape[1:], mode="bicubic", align_corners=False)[:, 0].numpy()
        slabs = [interpolate_slab(volume, shape, z0, min(4, shape[2] - z0), (0.0, 1.0)) for z0 in range(0, shape[2], 4)]
        np.testing.assert_allclose(np.concatenate(slabs, axis=2), np.clip(whole, 0, 1), rtol=0, atol=1e-6)


def test_plans_fit_the_memory_they_are_given():
    model2d = build_model("edsr", preset="tiny", width=8, scale=2)
    small = plan_inference(model2d, (512, 512, 300), memory_bytes=64 << 20)
    large = plan_inference(model2d, (512, 512, 300), memory_bytes=64 << 30)
    assert small.batch_size == 1 and large.batch_size == 64
    assert plan_inference(model2d, (512, 512, 300), memory_bytes=1, batch_size=7).batch_size == 7
    model3d = build_model("edsr", preset="tiny", width=8, spatial_dims=3, scale=2)
    tight = plan_inference(model3d, (256, 256, 200), memory_bytes=256 << 20)
    roomy = plan_inference(model3d, (256, 256, 200), memory_bytes=16 << 30)
    assert tight.tile < roomy.tile and tight.tile_batch_size <= roomy.tile_batch_size


def test_the_cli_tiles_a_3d_model_as_asked_with_the_same_result(tmp_path, one_thread):
    """--tile 12 (several slabs of tiles) and --tile 64 (one tile) give the same output file: the untrained 3D model
    is trilinear interpolation, whose 1-voxel reach lies within the tiles' discarded margin."""
    ckpt = checkpoint(tmp_path / "m.pt", spatial_dims=3)
    scan = ct_nifti(tmp_path / "in.nii.gz", shape=(20, 18, 14), dtype=np.float32)
    for tile in (12, 64):
        result = invoke(ckpt, scan, tmp_path / f"out{tile}.nii.gz", "--tile", tile, "--batch", 2, "--device", "cpu")
        assert result.exit_code == 0, result.output
    small, big = (np.asarray(nib.load(tmp_path / f"out{t}.nii.gz").dataobj) for t in (12, 64))
    assert small.shape == (40, 36, 28) and small.dtype == np.float32
    np.testing.assert_allclose(small, big, rtol=0, atol=1e-4 * 1400)  # 1e-4 of the HU range


# --------------------------------------------------------------------------------------------------- safety


class Interrupted(Exception):
    """What the test's progress callback raises once the first slab is written."""


def interrupt(done: int, total: int) -> None:
    raise Interrupted(f"stopped after {done} of {total} slices")


@pytest.mark.parametrize("output", ["out.nii.gz", "out_series"])
def test_a_failure_midway_leaves_no_partial_output_and_keeps_an_old_one(tmp_path, output, one_thread):
    ckpt = checkpoint(tmp_path / "m.pt")
    scan = ct_nifti(tmp_path / "in.nii.gz")
    model, source = load_model(ckpt), single_source(scan)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(Interrupted):
        infer_scan(model, source, tmp_path / output, InferOptions(batch_size=2), progress=interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing, not even a hidden temporary

    infer_scan(model, source, tmp_path / output, InferOptions(batch_size=2))
    first = sorted((p.name, p.read_bytes()) for p in [tmp_path / output, *(tmp_path / output).glob("*")]
                   if p.is_file())
    with pytest.raises(Interrupted):
        infer_scan(model, source, tmp_path / output, InferOptions(batch_size=2, overwrite=True), progress=interrupt)
    kept = sorted((p.name, p.read_bytes()) for p in [tmp_path / output, *(tmp_path / output).glob("*")] if p.is_file())
    assert kept == first and sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, output])


def test_outputs_are_never_written_over_without_overwrite_nor_over_the_input(tmp_path):
    ckpt = checkpoint(tmp_path / "m.pt")
    scan = ct_nifti(tmp_path / "in.nii.gz")
    original = scan.read_bytes()
    refused = invoke(ckpt, scan, scan, "--overwrite")
    assert refused.exit_code == 2 and "is or holds the input" in refused.output
    assert invoke(ckpt, scan, tmp_path / "out.nii.gz").exit_code == 0
    again = invoke(ckpt, scan, tmp_path / "out.nii.gz")
    assert again.exit_code == 2 and "already exists" in again.output and "--overwrite" in again.output
    assert invoke(ckpt, scan, tmp_path / "out.nii.gz", "--overwrite").exit_code == 0
    wrong = invoke(ckpt, scan, tmp_path / "series", "--format", "nifti")
    assert wrong.exit_code == 2 and "does not name a nifti output" in wrong.output
    assert scan.read_bytes() == original


# ---------------------------------------------------------------------------------------------- refusals


def test_a_model_that_does_not_fit_the_scan_is_refused(tmp_path, make):
    ct_model = load_model(checkpoint(tmp_path / "ct.pt"))
    mr_series = make.series(tmp_path / "mr", make.stored((18, 16, 5)), modality="MR", slope=1.0, intercept=0.0)
    with pytest.raises(InferenceError, match="is a MR scan; the model was trained on CT scans"):
        infer_scan(ct_model, single_source(tmp_path / "mr"), tmp_path / "out", InferOptions())
    assert not (tmp_path / "out").exists() and len(mr_series.files) == 5

    thin = ct_nifti(tmp_path / "thin.nii.gz", shape=(20, 18, 2))
    model3d = load_model(checkpoint(tmp_path / "3d.pt", spatial_dims=3))
    with pytest.raises(InferenceError, match="holds 2 slice.*3D model"):
        infer_scan(model3d, single_source(thin), tmp_path / "o.nii.gz", InferOptions())
    through = load_model(checkpoint(tmp_path / "tp.pt", family="smore"))
    with pytest.raises(InferenceError, match="restores the slice axis"):
        infer_scan(through, single_source(thin), tmp_path / "o.nii.gz", InferOptions())
    single = ct_nifti(tmp_path / "one.nii.gz", shape=(20, 18, 1))  # an in-plane model takes a single slice
    assert infer_scan(ct_model, single_source(single), tmp_path / "o.nii.gz", InferOptions()).output_shape == (40, 36, 1)

    isotropic = ct_nifti(tmp_path / "iso.nii.gz", spacing=(0.8, 0.8, 0.8))
    warned = infer_scan(through, single_source(isotropic), tmp_path / "iso_out.nii.gz", InferOptions())
    assert any("already about as thin" in w for w in warned.warnings)


def test_intensity_rules_are_taken_per_site_and_modality(tmp_path):
    scan = ct_nifti(tmp_path / "in.nii.gz")
    two = load_model(checkpoint(tmp_path / "two.pt", {"a": CT, "b": {**CT, "range": [-1000.0, 1000.0]}}))
    with pytest.raises(InferenceError, match="mapped CT intensities differently.*--site"):
        infer_scan(two, single_source(scan), tmp_path / "o.nii.gz", InferOptions())
    infer_scan(two, single_source(scan), tmp_path / "o.nii.gz", InferOptions(site="b"))
    mixed = load_model(checkpoint(tmp_path / "mixed.pt", {"a": CT, "m": MR}))
    with pytest.raises(InferenceError, match="records no modality.*--modality"):
        infer_scan(mixed, single_source(scan), tmp_path / "o2.nii.gz", InferOptions())
    infer_scan(mixed, single_source(scan), tmp_path / "o2.nii.gz", InferOptions(modality="MR"))
    header = nib.load(tmp_path / "o2.nii.gz").header
    assert header.get_data_dtype() == np.int16 and "fedsr edsr SR x2 in-plane" in header["descrip"].item().decode()


def test_a_run_folder_gives_its_final_model(tmp_path):
    assert RUN_MODEL == FINAL
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(InferenceError, match="not the folder of a finished run"):
        load_model(run)
    checkpoint(run / FINAL)
    assert load_model(run).path == run / FINAL


# ------------------------------------------------------------------------------------------------- batch


def test_batch_mode_goes_on_past_a_corrupt_scan_and_lists_it(tmp_path, make, one_thread):
    ckpt = checkpoint(tmp_path / "m.pt", perturb=True)
    inputs = tmp_path / "in"
    ct_nifti(inputs / "sub-01" / "ct.nii.gz")
    (inputs / "sub-02").mkdir()
    (inputs / "sub-02" / "ct.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    series = make.series(inputs / "patient3" / "ct", make.stored((18, 16, 4)))
    (inputs / "patient4").mkdir()
    (inputs / "patient4" / "IM0001.dcm").write_bytes(series.files[0].read_bytes()[:600])  # truncated

    result = invoke(ckpt, inputs, tmp_path / "out", "--preview", "--batch", 3)

    assert result.exit_code == 1, result.output
    assert "2 scan(s) done, 2 failed" in result.output
    failed = [line for line in result.output.splitlines() if line.startswith("failed:")]
    assert len(failed) == 2 and "patient4" in failed[0] and "truncated" in failed[0]
    assert "sub-02" in failed[1] and "cannot be read as NIfTI" in failed[1]
    assert nib.load(tmp_path / "out" / "sub-01" / "ct.nii.gz").shape == (40, 36, 6)
    assert len(list((tmp_path / "out" / "patient3" / "ct").glob("*.dcm"))) == 4
    for preview in (tmp_path / "out" / "sub-01" / "ct_preview.png", tmp_path / "out" / "patient3" / "ct_preview.png"):
        with Image.open(preview) as image:
            assert image.format == "PNG" and image.width > 2 * image.height


# ------------------------------------------------------------------------------------- model options (issue 10)


def conditioned_checkpoint(path: Path, rules: dict) -> Path:
    """A model conditioned on the acquisition, its weights moved off their initial values (as built, the FiLM is the
    identity and the model plain interpolation: the description would change nothing)."""
    torch.manual_seed(0)
    model = perturbed(build_model("edsr", preset="tiny", width=8, scale=2, condition="acquisition"))
    with torch.no_grad():
        films(model)[0].mlp[-1].weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(4))
    return save_checkpoint(path, model, scale=2, normalisation=rules)


def test_a_conditioned_model_takes_the_acquisition_given(tmp_path, one_thread):
    ckpt = conditioned_checkpoint(tmp_path / "c.pt", {"a": CT})
    scan = ct_nifti(tmp_path / "in.nii.gz")
    outputs = {}
    for thickness in (1, 5):
        result = invoke(ckpt, scan, tmp_path / f"t{thickness}.nii.gz",
                        "--acquisition", f"slice_thickness_mm={thickness}, noise_level=0.01")
        assert result.exit_code == 0, result.output
        outputs[thickness] = np.asarray(nib.load(tmp_path / f"t{thickness}.nii.gz").dataobj).astype(np.float64)
    assert "acquisition: kernel_sharpness from the default 0.5" in result.output
    assert "acquisition: field_strength_t from the default 0;" in result.output  # a CT scan: 0 T
    assert "slice_thickness_mm from the default" not in result.output and "noise_level from" not in result.output
    assert np.abs(outputs[1] - outputs[5]).max() > 10  # HU

    unknown = invoke(ckpt, scan, tmp_path / "x.nii.gz", "--acquisition", "slice_thickness=1")
    assert unknown.exit_code == 2 and "unknown field 'slice_thickness'" in unknown.output
    negative = invoke(ckpt, scan, tmp_path / "x.nii.gz", "--acquisition", "noise_level=-1")
    assert negative.exit_code == 2 and "noise_level must be a number >= 0" in negative.output
    blind = invoke(checkpoint(tmp_path / "blind.pt"), scan, tmp_path / "x.nii.gz", "--acquisition", "noise_level=0")
    assert blind.exit_code == 2 and "not conditioned on the acquisition" in blind.output
    assert not (tmp_path / "x.nii.gz").exists()


def test_a_dicom_inputs_headers_describe_its_acquisition(tmp_path, make, one_thread):
    """MagneticFieldStrength, SliceThickness (the series' 2.5 mm) and ConvolutionKernel (B30f: 0.3) set the
    description; --acquisition overrides a header."""
    model = load_model(conditioned_checkpoint(tmp_path / "c.pt", {"a": MR}))
    series = make.series(tmp_path / "mr", make.stored((18, 16, 4)), modality="MR", slope=1.0, intercept=0.0)
    for file in series.files:
        ds = pydicom.dcmread(file)
        ds.MagneticFieldStrength, ds.ConvolutionKernel = 3, "B30f"
        ds.save_as(file)
    source = single_source(tmp_path / "mr")

    result = infer_scan(model, source, tmp_path / "headers", InferOptions())
    described = {"field_strength_t": 3.0, "slice_thickness_mm": series.spacing[2], "kernel_sharpness": 0.3,
                 "noise_level": 0.0}
    torch.testing.assert_close(films(model.net)[0].vector, acquisition_vector(described))
    assert [w for w in result.warnings if w.startswith("acquisition:")] == \
        ["acquisition: noise_level from the default 0; pass --acquisition to set it"]

    infer_scan(model, source, tmp_path / "asked", InferOptions(acquisition={"field_strength_t": 1.5}))
    torch.testing.assert_close(films(model.net)[0].vector, acquisition_vector({**described, "field_strength_t": 1.5}))
    headers, asked = (read_scan(single_source(tmp_path / name), "MR").volume.array for name in ("headers", "asked"))
    assert headers.shape == asked.shape == (36, 32, 4) and np.abs(headers - asked).max() > 1


def personal_model(path: Path) -> nn.Module:
    """A small srcnn with a personal head, saved to ``path`` (its head as built)."""
    torch.manual_seed(0)
    model = perturbed(build_model("srcnn", preset="tiny", scale=2, personal="head"))
    save_checkpoint(path, model, scale=2, normalisation={"a": CT})
    return model


def write_head(path: Path, model: nn.Module, bodies: list[str], drop: int = 0) -> dict[str, torch.Tensor]:
    """A site's head file for ``model`` as client.personal writes it (random head weights; ``drop`` keys left out)."""
    state, generator = model.state_dict(), torch.Generator().manual_seed(5)
    head = {key: torch.randn(state[key].shape, generator=generator) for key in sorted(personal_keys(model))[drop:]}
    save_state_atomic(path, {"format": STATE_FORMAT, "version": STATE_VERSION, "round": 2, "head": head,
                             "model": json.dumps(model_spec(model), sort_keys=True), "bodies": bodies})
    return head


def test_a_personalised_model_needs_a_sites_head(tmp_path, one_thread):
    built = personal_model(tmp_path / "p.pt")
    name = head_path(built, tmp_path).name
    with pytest.raises(InferenceError, match=f"--head SITE/.fedsr-state/{name}"):
        load_model(tmp_path / "p.pt")
    body = {k: v for k, v in built.state_dict().items() if k not in personal_keys(built)}  # srcnn sends all else
    head = write_head(tmp_path / "site" / ".fedsr-state" / name, built, ["0" * 32, body_fingerprint(body)])

    model = load_model(tmp_path / "p.pt", head=tmp_path / "site" / ".fedsr-state" / name)
    state = model.net.state_dict()
    assert model.notes == () and personal_keys(built) == set(head)
    for key, value in {**body, **head}.items():
        torch.testing.assert_close(state[key], value)
    scan = ct_nifti(tmp_path / "in.nii.gz")
    assert infer_scan(model, single_source(scan), tmp_path / "o.nii.gz", InferOptions()).output_shape == (40, 36, 6)

    write_head(tmp_path / "other.pt", built, ["0" * 32])  # a head kept with another body
    warned = invoke(tmp_path / "p.pt", scan, tmp_path / "o2.nii.gz", "--head", tmp_path / "other.pt")
    assert warned.exit_code == 0 and "never trained or evaluated with the body" in warned.output

    write_head(tmp_path / "partial.pt", built, [body_fingerprint(body)], drop=1)
    with pytest.raises(InferenceError, match="partial.pt: is not a personal head of this model"):
        load_model(tmp_path / "p.pt", head=tmp_path / "partial.pt")
    missing = invoke(tmp_path / "p.pt", scan, tmp_path / "o3.nii.gz")
    assert missing.exit_code == 2 and name in missing.output and not (tmp_path / "o3.nii.gz").exists()
    blind = invoke(checkpoint(tmp_path / "blind.pt"), scan, tmp_path / "o3.nii.gz", "--head", tmp_path / "other.pt")
    assert blind.exit_code == 2 and "holds a model without one" in blind.output
