"""GAN super-resolution: an ESRGAN-style RRDB generator and a patch discriminator, trained as one "gan" pair.

Generator (Wang et al., 2018, "ESRGAN"), lite: head conv -> ``n_blocks`` residual-in-residual dense blocks
(three dense blocks each, residual scaling, no BatchNorm) -> body conv + long skip -> sub-pixel upsampling ->
HR conv -> output conv. With ``global_residual`` the network predicts a correction to the bicubic-upsampled
input and its output conv starts at zero, so the untrained generator returns exactly the bicubic image.

Discriminator: PatchGAN-style (Isola et al., 2017) strided 4x4 convolutions with LeakyReLU, returning one
logit per receptive field ("is this HR patch real?"). Its normalisation is GroupNorm, spectral norm or none,
never BatchNorm (per-sample gradients must stay possible for DP-SGD).

Families:

- ``"gan"``: :class:`GANPair`, holding ``.generator`` and ``.discriminator`` (state_dict keys ``generator.*``,
  ``discriminator.*``); ``forward(x)`` is the generator, so evaluation and inference treat it like any SR model.
- ``"rrdb"``: :class:`RRDBGenerator` alone, what :func:`export_generator` returns and checkpoints rebuild.

2D only (the GAN task samples in-plane patches); ``spatial_dims=3`` is refused with a clear error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from monai.networks.blocks import SubpixelUpsample
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from shared_models.registry import MODEL_OPTIONS, build_model, model_spec, register_model, unwrap
from shared_models.resample import upsample_baseline
from shared_models.settings import FamilyOptions, setting

#: state_dict prefix of the discriminator inside a "gan" pair (what stays at a site in "local" mode).
DISCRIMINATOR_PREFIX = "discriminator."
#: state_dict prefix of the generator inside a "gan" pair.
GENERATOR_PREFIX = "generator."
#: Discriminator modes of a federated GAN run: where the discriminator is trained and averaged.
DISCRIMINATOR_MODES = ("federated", "local")
DISCRIMINATOR_NORMS = ("group", "spectral", "none")

#: Generator hyperparameters (shared by "rrdb" and the generator half of "gan").
RRDB_PRESETS = {
    "tiny": {"n_blocks": 1, "width": 32, "growth": 16, "dense_layers": 4},
    "small": {"n_blocks": 4, "width": 48, "growth": 24, "dense_layers": 5},
    "base": {"n_blocks": 8, "width": 64, "growth": 32, "dense_layers": 5},  # ESRGAN has 23 blocks x 64/32
}
GAN_PRESETS = {
    "tiny": {**RRDB_PRESETS["tiny"], "d_width": 16},
    "small": {**RRDB_PRESETS["small"], "d_width": 32},
    "base": {**RRDB_PRESETS["base"], "d_width": 64},
}
_GENERATOR_PARAMS = (
    "spatial_dims", "in_channels", "scale", "n_blocks", "width", "growth", "dense_layers", "res_scale",
    "global_residual",
)
#: The generator's reconstruction head (``personal = "head"``): the upsampler, the HR conv and the output conv.
GENERATOR_HEAD = ("upsample", "hr_conv", "tail")
#: The generator's module whose output ``condition = "acquisition"`` modulates (the RRDB trunk, before the skip).
GENERATOR_CONDITIONED = "body"


@dataclass(frozen=True)
class GanOptions(FamilyOptions):
    """The GAN's run options (``gan.discriminator`` ...), sent to the sites with each round.

    Rounds ``1..warmup_rounds`` train the generator with the pixel loss only (ESRGAN's PSNR-oriented start); after
    that the generator loss adds ``adversarial_weight`` x the relativistic adversarial term.
    """

    namespace = "gan."

    discriminator: str = setting(
        "federated", "federated: both networks are averaged; local: the discriminator never leaves the site.",
        choices=DISCRIMINATOR_MODES,
    )
    warmup_rounds: int = setting(1, "Rounds of pixel-loss-only generator training before adversarial training.",
                                 minimum=0)
    adversarial_weight: float = setting(0.005, "Weight of the adversarial term after warm-up.", minimum=0.0)

    def adversarial(self, server_round: int) -> bool:
        """Whether this round trains adversarially (after warm-up, with a positive weight)."""
        return server_round > self.warmup_rounds and self.adversarial_weight > 0


def _check_2d(spatial_dims: int) -> None:
    if spatial_dims != 2:
        raise ValueError(
            f"the GAN models are 2D only (spatial_dims=2), got spatial_dims={spatial_dims}; the GAN task trains on "
            "in-plane patches, use a supervised family (edsr) for 3D"
        )


def _conv3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)


def _lrelu() -> nn.LeakyReLU:
    return nn.LeakyReLU(0.2)


class DenseBlock(nn.Module):
    """Residual dense block: ``dense_layers`` convs, each fed every earlier feature map; scaled residual."""

    def __init__(self, width: int, growth: int, dense_layers: int, res_scale: float) -> None:
        super().__init__()
        self.convs = nn.ModuleList(_conv3(width + i * growth, growth) for i in range(dense_layers - 1))
        self.fuse = _conv3(width + (dense_layers - 1) * growth, width)
        self.act = _lrelu()
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for conv in self.convs:
            features.append(self.act(conv(torch.cat(features, dim=1))))
        return x + self.res_scale * self.fuse(torch.cat(features, dim=1))


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks inside one scaled residual."""

    def __init__(self, width: int, growth: int, dense_layers: int, res_scale: float) -> None:
        super().__init__()
        self.body = nn.Sequential(*(DenseBlock(width, growth, dense_layers, res_scale) for _ in range(3)))
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.res_scale * self.body(x)


def _upsampler(width: int, scale: int) -> nn.Sequential:
    """Sub-pixel stages (x2 per stage for powers of two, one x3 stage), each followed by LeakyReLU.

    MONAI's pad-and-pool step is off (it zero-pads one side and biases the border), as in shared_models.edsr.
    """
    if scale == 3:
        factors = [3]
    elif scale >= 2 and scale & (scale - 1) == 0:
        factors = [2] * int(math.log2(scale))
    else:
        raise ValueError(f"scale must be 3 or a power of two >= 2, got {scale}")
    layers: list[nn.Module] = []
    for factor in factors:
        layers += [SubpixelUpsample(2, width, width, scale_factor=factor, apply_pad_pool=False), _lrelu()]
    return nn.Sequential(*layers)


@register_model("rrdb", presets=RRDB_PRESETS, head=GENERATOR_HEAD, conditioned=GENERATOR_CONDITIONED)
class RRDBGenerator(nn.Module):
    """ESRGAN-style generator (RRDB-lite), 2D.

    Input (B, in_channels, H, W), intensities in [0, 1]; output (B, in_channels, scale*H, scale*W), not clamped.
    ``res_scale`` scales every dense-block and RRDB residual (0.2 in ESRGAN).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        scale: int = 2,
        n_blocks: int = 8,
        width: int = 64,
        growth: int = 32,
        dense_layers: int = 5,
        res_scale: float = 0.2,
        global_residual: bool = True,
    ) -> None:
        super().__init__()
        _check_2d(spatial_dims)
        if in_channels < 1 or n_blocks < 0 or width < 1 or growth < 1 or dense_layers < 2:
            raise ValueError(
                "need in_channels >= 1, n_blocks >= 0, width >= 1, growth >= 1, dense_layers >= 2; got "
                f"{in_channels}, {n_blocks}, {width}, {growth}, {dense_layers}"
            )
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.scale = scale
        self.global_residual = global_residual

        self.head = _conv3(in_channels, width)
        self.body = nn.Sequential(
            *(RRDB(width, growth, dense_layers, res_scale) for _ in range(n_blocks)), _conv3(width, width)
        )
        self.upsample = _upsampler(width, scale)
        self.hr_conv = nn.Sequential(_conv3(width, width), _lrelu())
        self.tail = _conv3(width, in_channels)
        if global_residual:
            nn.init.zeros_(self.tail.weight)
            nn.init.zeros_(self.tail.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, C, scale*H, scale*W)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"RRDB generator expects (B, {self.in_channels}, H, W), got shape {tuple(x.shape)}")
        features = self.head(x)
        features = features + self.body(features)
        out = self.tail(self.hr_conv(self.upsample(features)))
        if self.global_residual:
            out = out + upsample_baseline(x, self.scale)
        return out


def _group_count(channels: int) -> int:
    """Up to 8 groups, always a divisor of ``channels``."""
    return math.gcd(8, channels)


class PatchDiscriminator(nn.Module):
    """PatchGAN-style critic: one logit per receptive field of the input HR(-sized) image.

    ``layers`` stride-2 4x4 convs (width doubling, capped at 8x) + one stride-1 4x4 conv, then a 3x3 conv to one
    channel. Normalisation on every conv but the first: GroupNorm (``"group"``), spectral norm on the weights
    (``"spectral"``) or none. Input (B, C, H, W) with H, W >= 2**(layers + 1); output (B, 1, h, w) raw logits.
    """

    def __init__(self, in_channels: int = 1, width: int = 64, layers: int = 3, norm: str = "group") -> None:
        super().__init__()
        if norm not in DISCRIMINATOR_NORMS:
            raise ValueError(f"discriminator norm must be one of {', '.join(DISCRIMINATOR_NORMS)}, got {norm!r}")
        if in_channels < 1 or width < 1 or layers < 1:
            raise ValueError(f"need in_channels, width, layers >= 1; got {in_channels}, {width}, {layers}")
        self.layers = layers

        def block(c_in: int, c_out: int, stride: int, normalise: bool) -> list[nn.Module]:
            grouped = normalise and norm == "group"  # GroupNorm's shift makes the conv bias redundant
            conv = nn.Conv2d(c_in, c_out, kernel_size=4, stride=stride, padding=1, bias=not grouped)
            if normalise and norm == "spectral":
                conv = spectral_norm(conv)
            out: list[nn.Module] = [conv]
            if normalise and norm == "group":
                out.append(nn.GroupNorm(_group_count(c_out), c_out))
            return [*out, _lrelu()]

        modules: list[nn.Module] = block(in_channels, width, 2, normalise=False)
        channels = width
        for i in range(1, layers):
            out_channels = width * min(2**i, 8)
            modules += block(channels, out_channels, 2, normalise=True)
            channels = out_channels
        out_channels = width * min(2**layers, 8)
        modules += block(channels, out_channels, 1, normalise=True)
        classifier = nn.Conv2d(out_channels, 1, kernel_size=3, padding=1)
        modules.append(spectral_norm(classifier) if norm == "spectral" else classifier)
        self.body = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1, H // 2**layers - 1, W // 2**layers - 1) logits."""
        minimum = 2 ** (self.layers + 1)
        if x.ndim != 4 or min(x.shape[2:]) < minimum:
            raise ValueError(
                f"the discriminator needs (B, C, H, W) with H, W >= {minimum} (layers={self.layers}), "
                f"got shape {tuple(x.shape)}; use larger patches"
            )
        return self.body(x)


def export_generator(model: nn.Module) -> nn.Module:
    """A standalone "rrdb" generator (a copy) with the pair's generator weights, for checkpoints and inference.

    ``save_checkpoint(path, export_generator(pair), scale=...)`` + ``load_checkpoint(path)`` rebuild it without
    the discriminator. A model that already is an "rrdb" generator is copied as it is. The model options
    (``personal``, ``condition``: :data:`shared_models.registry.MODEL_OPTIONS`) carry over, and with them the FiLM.
    """
    model = unwrap(model)
    spec = model_spec(model)
    if spec["name"] == "rrdb":
        source = model
    elif spec["name"] == "gan":
        source = model.generator
    else:
        raise ValueError(f"export_generator needs a 'gan' or 'rrdb' model, got {spec['name']!r}")
    params = spec["params"]
    generator = build_model("rrdb", **{k: params[k] for k in (*_GENERATOR_PARAMS, *MODEL_OPTIONS) if k in params})
    generator.load_state_dict(source.state_dict())
    return generator.to(next(source.parameters()).device)


def federated_state(model: nn.Module, discriminator: str) -> dict[str, torch.Tensor]:
    """The state that leaves a site: every key (``"federated"``) or the generator's only (``"local"``).

    Tensors are detached but not copied (move them to the CPU before sending).
    """
    if discriminator not in DISCRIMINATOR_MODES:
        raise ValueError(f"discriminator mode must be one of {', '.join(DISCRIMINATOR_MODES)}, got {discriminator!r}")
    state = unwrap(model).state_dict()
    if discriminator == "local":
        state = {k: v for k, v in state.items() if not k.startswith(DISCRIMINATOR_PREFIX)}
    return {k: v.detach() for k, v in state.items()}


def _travelling_state(model: nn.Module, options: GanOptions | None) -> dict[str, torch.Tensor]:
    return federated_state(model, (options or GanOptions()).discriminator)


@register_model(
    "gan", presets=GAN_PRESETS, options=GanOptions, task="client.tasks.gan:GanTask",
    shared_state=_travelling_state, export=export_generator,
    head=tuple(GENERATOR_PREFIX + path for path in GENERATOR_HEAD),
    conditioned=GENERATOR_PREFIX + GENERATOR_CONDITIONED, train_metrics=("d-loss", "g-adv-loss"),
)
class GANPair(nn.Module):
    """Generator + discriminator as one model: ``forward(x)`` = ``generator(x)``.

    Generator parameters as :class:`RRDBGenerator`; ``d_width``/``d_layers``/``d_norm`` shape the
    :class:`PatchDiscriminator`.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        scale: int = 2,
        n_blocks: int = 8,
        width: int = 64,
        growth: int = 32,
        dense_layers: int = 5,
        res_scale: float = 0.2,
        global_residual: bool = True,
        d_width: int = 64,
        d_layers: int = 3,
        d_norm: str = "group",
    ) -> None:
        super().__init__()
        _check_2d(spatial_dims)
        self.spatial_dims = spatial_dims
        self.scale = scale
        self.generator = RRDBGenerator(
            spatial_dims=spatial_dims, in_channels=in_channels, scale=scale, n_blocks=n_blocks, width=width,
            growth=growth, dense_layers=dense_layers, res_scale=res_scale, global_residual=global_residual,
        )
        self.discriminator = PatchDiscriminator(in_channels=in_channels, width=d_width, layers=d_layers, norm=d_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The generator's super-resolved image."""
        return self.generator(x)
