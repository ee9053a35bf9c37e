"""shared_models model zoo: SRCNN, 3D EDSR, SwinIR-light, tiled 3D inference, the catalog."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from shared_models import registry
from shared_models.catalog import model_catalog
from shared_models.checkpoint import load_checkpoint, save_checkpoint
from shared_models.inference import super_resolve, tiled_forward
from shared_models.registry import build_model, count_parameters, model_spec
from shared_models.resample import upsample_baseline
from shared_models.swinir import WindowAttention
from tests.conftest import overfit_losses


def _perturbed(model: nn.Module, amount: float = 0.02, seed: int = 0) -> nn.Module:
    """Leave the zero-initialised (interpolation-only) state so that outputs depend on every weight."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(amount * torch.randn(p.shape, generator=generator))
    return model


# ------------------------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize(
    ("family", "lr_shape"),
    [
        ("srcnn", (2, 1, 12, 12)),
        ("srcnn", (1, 1, 8, 7, 6)),
        ("edsr", (2, 1, 12, 12)),
        ("edsr", (1, 1, 8, 7, 6)),
        ("swinir", (2, 1, 12, 12)),
    ],
)
def test_output_is_scale_times_the_input(one_thread, family: str, lr_shape: tuple[int, ...], scale: int) -> None:
    model = build_model(family, preset="tiny", spatial_dims=len(lr_shape) - 2, scale=scale)
    with torch.no_grad():
        out = model(torch.rand(lr_shape))
    assert out.shape == (*lr_shape[:2], *(scale * n for n in lr_shape[2:]))


def test_swinir_is_2d_only() -> None:
    with pytest.raises(ValueError, match="2D only"):
        build_model("swinir", preset="tiny", spatial_dims=3)


@pytest.mark.parametrize("lr_hw", [(13, 10), (9, 17), (5, 3)])
def test_swinir_pads_sizes_that_are_not_window_multiples(one_thread, lr_hw: tuple[int, int]) -> None:
    """13x10 / 9x17 are reflect-padded to multiples of the window 8; 5x3 is smaller than its padding (replicated)."""
    lr = torch.rand(2, 1, *lr_hw)
    untrained = build_model("swinir", preset="tiny", scale=3)
    trained = _perturbed(build_model("swinir", preset="tiny", scale=3))
    with torch.no_grad():
        torch.testing.assert_close(untrained(lr), upsample_baseline(lr, 3), rtol=0, atol=1e-7)
        out = trained(lr)
        # each image of the batch is padded and cropped on its own: the result does not depend on the batch
        torch.testing.assert_close(out[1:], trained(lr[1:]), rtol=1e-5, atol=1e-6)
    assert out.shape == (2, 1, 3 * lr_hw[0], 3 * lr_hw[1]) and torch.isfinite(out).all()


def test_untrained_srcnn_returns_the_interpolated_input() -> None:
    for lr in (torch.rand(2, 1, 10, 12), torch.rand(1, 1, 5, 6, 4)):
        model = build_model("srcnn", preset="tiny", spatial_dims=lr.ndim - 2, scale=2)
        with torch.no_grad():
            torch.testing.assert_close(model(lr), upsample_baseline(lr, 2), rtol=0, atol=1e-7)


def test_new_families_have_no_batchnorm_and_only_parameters_in_their_state_dict() -> None:
    """BatchNorm is not DP-compatible; buffers would travel to the coordinator and be averaged."""
    for family in ("srcnn", "swinir"):
        model = build_model(family, preset="small")
        assert not [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert set(model.state_dict()) == {name for name, _ in model.named_parameters()}


# ------------------------------------------------------------------------------------------ Swin attention


def _naive_window_attention(attn: WindowAttention, qkv: torch.Tensor) -> torch.Tensor:
    """The (shifted) window attention written token pair by token pair, without rolling or masks: tokens p and
    q attend iff they fall in the same window of the grid offset by ``shift`` and that window does not wrap
    around the image edge between them; the bias is looked up by their (row, column) offset."""
    _, h, w, three_c = qkv.shape
    dim, heads, win, shift = attn.dim, attn.num_heads, attn.window_size, attn.shift_size
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    # window coordinates after a cyclic shift by -shift; "unwrapped" coordinates detect pairs split by the edge
    r_roll, c_roll = (rows - shift) % h, (cols - shift) % w
    same_window = (r_roll[:, None] // win == r_roll[None, :] // win) & (
        c_roll[:, None] // win == c_roll[None, :] // win
    )
    no_wrap = (r_roll[:, None] - r_roll[None, :] == rows[:, None] - rows[None, :]) & (
        c_roll[:, None] - c_roll[None, :] == cols[:, None] - cols[None, :]
    )
    allowed = same_window & no_wrap
    d_row = (rows[:, None] - rows[None, :]).clamp(-(win - 1), win - 1) + win - 1
    d_col = (cols[:, None] - cols[None, :]).clamp(-(win - 1), win - 1) + win - 1
    bias = attn.relative_position_bias_table[d_row * (2 * win - 1) + d_col].permute(2, 0, 1)  # (heads, L, L)
    q, k, v = qkv.reshape(-1, h * w, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) / math.sqrt(dim // heads) + bias
    logits = logits.masked_fill(~allowed, float("-inf"))
    out = logits.softmax(-1) @ v  # (B, heads, L, head_dim)
    return out.transpose(1, 2).reshape(-1, h, w, dim)


@pytest.mark.parametrize("shift", [0, 4])
def test_window_attention_matches_a_token_by_token_reference(shift: int) -> None:
    torch.manual_seed(0)
    attn = WindowAttention(dim=12, num_heads=3, window_size=8, shift_size=shift)
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()  # make the bias matter
    qkv = torch.randn(2, 16, 24, 36)
    with torch.no_grad():
        torch.testing.assert_close(attn(qkv), _naive_window_attention(attn, qkv), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_swinir_per_sample_gradients_under_opacus_are_exact(one_thread) -> None:
    """DP-SGD needs per-sample gradients: Opacus's hooks (Linear/LayerNorm/Conv2d) plus its functorch fallback
    for the attention's bias table must reproduce the gradient of each sample computed alone."""
    from opacus import GradSampleModule

    torch.manual_seed(0)
    model = _perturbed(build_model("swinir", preset="tiny", n_groups=1, depth=2, embed_dim=12))
    reference = copy.deepcopy(model)
    lr = torch.rand(3, 1, 12, 12)
    GradSampleModule(model, loss_reduction="sum")(lr).square().sum().backward()
    for i in range(3):
        reference.zero_grad()
        reference(lr[i : i + 1]).square().sum().backward()
        for (name, p), (_, ref) in zip(model.named_parameters(), reference.named_parameters()):
            torch.testing.assert_close(p.grad_sample[i], ref.grad, rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------- parameter counts


def test_srcnn_parameter_counts_are_the_published_layouts() -> None:
    # 9-5-5, 64/32 filters, one channel (Dong et al. TPAMI 2016): 64*81+64 + 32*64*25+32 + 32*25+1 = 57,281
    # (57,184 weights + 97 biases). The ECCV 2014 base network 9-1-5: 5,248 + 2,080 + 801 = 8,129
    # (8,032 weights, the paper's count, + 97 biases).
    assert count_parameters(build_model("srcnn", preset="base")) == 57_281
    assert count_parameters(build_model("srcnn", preset="base", mid_kernel=1)) == 8_129
    assert model_spec(build_model("srcnn", preset="base"))["params"]["scale"] == 2
    sizes = [count_parameters(build_model("srcnn", preset=p)) for p in ("tiny", "small", "base")]
    assert sizes == sorted(sizes)


def test_swinir_light_parameter_counts() -> None:
    """SwinIR-light (3 channels): the reference code's layout has 910,152 (x2) / 929,628 (x4) parameters:
    conv_first 1,680 + patch LayerNorm 120 + 4 RSTB x (6 blocks x 30,810 + conv 32,460) + LayerNorm 120
    + conv_after_body 32,460 + upsampling conv 6,492 (x2) / 25,968 (x4). The paper's table says 878K / 897K
    (and 886K x3): exactly these counts without conv_after_body (877,692 / 885,807 / 897,168)."""
    def count(scale: int, **params) -> int:
        return count_parameters(build_model("swinir", preset="base", in_channels=3, scale=scale, **params))

    assert (count(2), count(4)) == (910_152, 929_628)
    assert (count(2, body_conv=False), count(3, body_conv=False), count(4, body_conv=False)) == (
        877_692, 885_807, 897_168,
    )
    for scale, published in ((2, 878_000), (4, 897_000)):
        assert abs(count(scale, body_conv=False) - published) / published < 0.03
        assert abs(count(scale) - published) / published < 0.04  # one 60x60 3x3 conv more
    sizes = [count_parameters(build_model("swinir", preset=p)) for p in ("tiny", "small", "base")]
    assert sizes == sorted(sizes)


# ------------------------------------------------------------------------------------------------ learning


@pytest.mark.parametrize(
    ("family", "params", "steps", "lr"),
    [("srcnn", {}, 200, 3e-3), ("swinir", {"n_groups": 1}, 120, 4e-3)],
)
def test_new_family_overfits_one_real_patch_pair(
    mr_patch_pair, one_thread, family: str, params: dict, steps: int, lr: float
) -> None:
    """Adam on one 16->32 px pair without the global skip: the L1 loss must fall >= 10x from the untrained output
    (observed over seeds 0-2: SRCNN tiny 17-21x in 1.5-4 s; SwinIR tiny with one group of a regular and a
    shifted block 18-24x in 1.4-4 s on one CPU thread of the shared machine)."""
    torch.manual_seed(0)
    lr_patch, hr_patch = mr_patch_pair
    model = build_model(family, preset="tiny", global_residual=False, **params)
    losses = overfit_losses(model, lr_patch, hr_patch, steps, lr)
    assert losses[0] / losses[-1] >= 10.0, (losses[0], losses[-1])


# ---------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize(
    ("family", "params", "lr_shape"),
    [
        ("srcnn", {"scale": 4}, (2, 1, 9, 11)),
        ("srcnn", {"spatial_dims": 3}, (1, 1, 5, 4, 6)),
        ("swinir", {"scale": 4, "window_size": 4}, (2, 1, 9, 11)),
    ],
)
def test_checkpoint_round_trip_rebuilds_identical_outputs(
    tmp_path: Path, family: str, params: dict, lr_shape: tuple[int, ...]
) -> None:
    model = _perturbed(build_model(family, preset="tiny", **params))
    scale = model_spec(model)["params"]["scale"]
    path = save_checkpoint(tmp_path / f"{family}.pt", model, scale=scale, extra={"round": 3})
    loaded, meta = load_checkpoint(path)
    lr = torch.rand(lr_shape)
    with torch.no_grad():
        assert torch.equal(loaded(lr), model.eval()(lr))
    assert meta["model"] == model_spec(model) and meta["scale"] == scale and not loaded.training


# --------------------------------------------------------------------------------------------- inference


def test_tiled_3d_super_resolve_equals_the_untiled_forward(one_thread) -> None:
    """An untrained 3D EDSR (4 blocks, narrowed to width 8 for speed) is trilinear interpolation: blending the
    default 32^3 tiles (overlap 8; 2 x 2 x 1 tiles here) must reproduce it."""
    rng = np.random.default_rng(0)
    volume = rng.random((40, 36, 28), dtype=np.float32)
    model = build_model("edsr", preset="tiny", width=8, spatial_dims=3, scale=2)
    sr = super_resolve(model, volume)
    with torch.no_grad():
        untiled = model(torch.from_numpy(volume)[None, None]).clamp(0, 1)[0, 0].numpy()
    assert sr.shape == (80, 72, 56) and sr.dtype == np.float32
    np.testing.assert_allclose(sr, untiled, rtol=0, atol=1e-5)


def test_tiled_forward_of_a_trained_model_is_exact_where_its_receptive_field_fits_the_margin(one_thread) -> None:
    """A 3D EDSR without residual blocks sees <= 4 LR voxels around each output voxel; with overlap 16 the
    discarded tile margin is 4, so the blend equals the untiled forward; output slices may be picked (any
    order, repeats allowed) and tiles feeding none of them are skipped."""
    rng = np.random.default_rng(1)
    volume = rng.random((40, 36, 28), dtype=np.float32)
    model = _perturbed(build_model("edsr", spatial_dims=3, n_blocks=0, width=4, scale=2), amount=0.05)
    with torch.no_grad():
        untiled = model(torch.from_numpy(volume)[None, None])
    tiled = tiled_forward(model, torch.from_numpy(volume)[None, None], tile=24, overlap=16)
    torch.testing.assert_close(tiled, untiled, rtol=0, atol=1e-5)
    trilinear = upsample_baseline(torch.from_numpy(volume)[None, None], 2)
    assert (untiled - trilinear).abs().max() > 0.01  # the perturbed model is not just interpolation

    picked = super_resolve(model, volume, slices=[5, 3, 3, 55], tile=24, overlap=16)
    np.testing.assert_allclose(picked, untiled.clamp(0, 1)[0, 0, :, :, [5, 3, 3, 55]].numpy(), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="slices"):
        super_resolve(model, volume, slices=[56])


def test_2d_super_resolve_still_works_slice_by_slice() -> None:
    rng = np.random.default_rng(2)
    volume = rng.random((12, 10, 5), dtype=np.float32)
    model = _perturbed(build_model("srcnn", preset="tiny", scale=2))
    sr = super_resolve(model, volume, slices=np.array([4, 1]), batch_size=1)
    with torch.no_grad():
        expected = model(torch.from_numpy(np.moveaxis(volume[:, :, [4, 1]], 2, 0)[:, None].copy())).clamp(0, 1)
    assert sr.shape == (24, 20, 2)
    np.testing.assert_allclose(sr, np.moveaxis(expected[:, 0].numpy(), 0, 2), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ catalog


def test_catalog_lists_every_family_and_preset() -> None:
    rows = model_catalog()
    expected = {(name, preset) for name, fam in registry.families().items() for preset in (list(fam.presets) or [None])}
    assert {(row["family"], row["preset"]) for row in rows} == expected
    assert all(set(row) == {"family", "preset", "spatial_dims", "params_2d_x2"} for row in rows)
    by_key = {(row["family"], row["preset"]): row for row in rows}
    assert by_key["srcnn", "base"]["params_2d_x2"] == 57_281
    assert by_key["swinir", "base"]["spatial_dims"] == [2]
    assert by_key["edsr", "tiny"]["spatial_dims"] == [2, 3]
    assert by_key["edsr", "base"]["params_2d_x2"] == count_parameters(build_model("edsr", preset="base"))
