"""shared_models: EDSR architecture, model registry and checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from shared_models import registry
from shared_models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from shared_models.registry import build_model, count_parameters, model_spec, register_model
from shared_models.resample import upsample_baseline
from tests.conftest import overfit_losses


@pytest.mark.parametrize(
    ("spatial_dims", "scale", "lr_shape"),
    [
        (2, 2, (2, 1, 12, 10)),
        (2, 3, (2, 1, 12, 10)),
        (2, 4, (2, 1, 12, 10)),
        (3, 2, (1, 1, 6, 5, 4)),
        (3, 4, (1, 1, 6, 5, 4)),
    ],
)
def test_edsr_output_shape(spatial_dims: int, scale: int, lr_shape: tuple[int, ...]) -> None:
    model = build_model("edsr", preset="tiny", spatial_dims=spatial_dims, scale=scale)
    out = model(torch.rand(lr_shape))
    assert out.shape == (*lr_shape[:2], *(scale * n for n in lr_shape[2:]))


def test_edsr_rejects_wrong_input_layout() -> None:
    model = build_model("edsr", preset="tiny")
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(torch.rand(1, 2, 8, 8))


def test_edsr_rejects_unsupported_scale() -> None:
    with pytest.raises(ValueError, match="scale"):
        build_model("edsr", preset="tiny", scale=5)


def test_base_preset_matches_published_edsr_baseline() -> None:
    # EDSR baseline (16 blocks x 64, res_scale 1, RGB): head 1,792 + blocks 16 x 73,856 + body conv 36,928
    # + x2 sub-pixel conv 147,712 + output conv 1,731 = 1,369,859 ("1.37M" in Lim et al. 2017); x4 adds one more
    # sub-pixel stage (1.52M). EDSR's fixed RGB mean-shift convs (24 frozen values) have no counterpart here.
    x2 = count_parameters(build_model("edsr", preset="base", in_channels=3, scale=2))
    x4 = count_parameters(build_model("edsr", preset="base", in_channels=3, scale=4))
    assert x2 == 1_369_859
    assert abs(x2 - 1.37e6) / 1.37e6 < 0.02
    assert abs(x4 - 1.52e6) / 1.52e6 < 0.02


def test_preset_sizes_grow_and_have_no_normalisation_layers() -> None:
    sizes = [count_parameters(build_model("edsr", preset=p)) for p in ("tiny", "small", "base")]
    assert sizes == sorted(sizes) and sizes[0] > 0
    model = build_model("edsr", preset="small", spatial_dims=3)
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
    assert not [m for m in model.modules() if isinstance(m, norm_types)]


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_untrained_model_returns_the_interpolated_input(spatial_dims: int) -> None:
    lr = torch.rand((2, 1, 10, 12) if spatial_dims == 2 else (1, 1, 6, 6, 6))
    model = build_model("edsr", preset="tiny", spatial_dims=spatial_dims, scale=4)
    with torch.no_grad():
        torch.testing.assert_close(model(lr), upsample_baseline(lr, 4), rtol=0, atol=1e-7)


def test_model_spec_rebuilds_same_architecture_and_presets_can_be_overridden() -> None:
    model = build_model("edsr", preset="tiny", width=16, res_scale=0.1)
    spec = model_spec(model)
    assert spec["name"] == "edsr"
    assert spec["params"] == {
        "spatial_dims": 2, "in_channels": 1, "n_blocks": 4, "width": 16, "res_scale": 0.1, "scale": 2,
        "global_residual": True,
    }
    rebuilt = build_model(spec["name"], **spec["params"])
    assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in model.parameters()]


@pytest.mark.parametrize(
    ("name", "params", "listed"),
    [("unet9", {}, "edsr"), ("edsr", {"depth": 3}, "n_blocks"), ("edsr", {"preset": "huge"}, "tiny")],
)
def test_registry_errors_list_what_is_known(name: str, params: dict, listed: str) -> None:
    with pytest.raises(ValueError, match=listed):
        build_model(name, **params)


def test_a_new_family_registers_with_the_decorator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "MODELS", dict(registry.families()))

    @register_model("toy", presets={"wide": {"width": 8}})
    class Toy(nn.Module):
        def __init__(self, width: int = 2) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, width, 3)

    model = build_model("toy", preset="wide")
    assert isinstance(model, Toy) and model.conv.out_channels == 8
    assert model_spec(model) == {"name": "toy", "params": {"width": 8}}
    with pytest.raises(ValueError, match="already registered"):
        register_model("toy")(Toy)


def test_count_parameters_trainable_only() -> None:
    model = build_model("edsr", preset="tiny")
    model.head.requires_grad_(False)
    frozen = sum(p.numel() for p in model.head.parameters())
    assert count_parameters(model, trainable_only=True) == count_parameters(model) - frozen


@pytest.mark.parametrize(("global_residual", "min_drop"), [(False, 10.0), (True, 3.0)])
def test_tiny_edsr_overfits_one_real_patch_pair(
    mr_patch_pair, one_thread, global_residual: bool, min_drop: float
) -> None:
    """300 Adam steps on one 16->32 px pair (~5 s on one CPU thread). Without the global skip the L1 loss must fall
    >= 10x from the untrained output (observed 27-136x over seeds 0-2); with it, the start is already the bicubic
    error (0.014 on this smooth averaged brain), and the loss must fall >= 3x below that (observed 3.7-5.5x)."""
    torch.manual_seed(0)
    lr, hr = mr_patch_pair
    model = build_model("edsr", preset="tiny", global_residual=global_residual)
    steps = 300
    losses = overfit_losses(model, lr, hr, steps, 2e-3)
    assert losses[0] / losses[-1] >= min_drop, (losses[0], losses[-1])


def test_checkpoint_round_trip_rebuilds_identical_model(tmp_path: Path) -> None:
    model = build_model("edsr", preset="tiny", scale=4, width=16)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # leave the zero-initialised state
    normalisation = {"kind": "mr-percentile", "lo": 3.5, "hi": 812.0}
    path = save_checkpoint(
        tmp_path / "ckpt" / "global.pt", model, scale=4, normalisation=normalisation, extra={"round": 7, "site": "a"}
    )
    assert sorted(os.listdir(path.parent)) == ["global.pt"]  # no temporary file left behind

    loaded, meta = load_checkpoint(path)
    lr = torch.rand(2, 1, 9, 11)
    with torch.no_grad():
        assert torch.equal(loaded(lr), model(lr))
    assert not loaded.training
    assert meta["model"] == model_spec(model)
    assert (meta["scale"], meta["normalisation"], meta["extra"]) == (4, normalisation, {"round": 7, "site": "a"})
    assert meta["format"] == "fedsr-checkpoint" and meta["version"] == 1

    save_checkpoint(path, build_model("edsr", preset="tiny", scale=2), scale=2)  # atomic overwrite
    assert load_checkpoint(path)[1]["scale"] == 2


def test_truncated_checkpoint_error_names_the_file(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "model.pt", build_model("edsr", preset="tiny"), scale=2)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pt.*truncated or corrupt"):
        load_checkpoint(truncated)


def test_foreign_files_are_not_checkpoints(tmp_path: Path) -> None:
    plain = tmp_path / "state_dict.pt"
    torch.save(build_model("edsr", preset="tiny").state_dict(), plain)
    with pytest.raises(CheckpointError, match="state_dict.pt: not a fedsr checkpoint"):
        load_checkpoint(plain)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.pt"):
        load_checkpoint(text)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_save_refuses_contradictory_scale_and_non_plain_metadata(tmp_path: Path) -> None:
    model = build_model("edsr", preset="tiny", scale=2)
    with pytest.raises(ValueError, match="scale"):
        save_checkpoint(tmp_path / "a.pt", model, scale=4)
    with pytest.raises(TypeError, match=r"extra\.when"):
        save_checkpoint(tmp_path / "a.pt", model, scale=2, extra={"when": object()})
    assert not list(tmp_path.iterdir())


def test_checkpoint_of_an_opacus_wrapped_model_stores_the_plain_model(tmp_path: Path) -> None:
    from opacus import GradSampleModule  # the client trains DP-SGD models wrapped like this

    model = build_model("edsr", preset="tiny", width=8)
    wrapped = GradSampleModule(model)
    assert model_spec(wrapped) == model_spec(model)
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path / "dp.pt", wrapped, scale=2))
    assert loaded.state_dict().keys() == model.state_dict().keys()
