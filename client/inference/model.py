"""The model ``fedsr infer`` applies: a checkpoint (or a run folder's final model), what it does to a scan's grid,
the intensity rule it was trained with, and whether it fits a given scan.

Checks (refusals raise :class:`~client.inference.errors.InferenceError`; the unusual only warns):

- modality: a scan of a modality none of the checkpoint's sites trained on is refused (a CT model on an MR scan);
- a model that restores the slice axis, or a 3D model, refuses a scan of fewer than :data:`MIN_SLICES` slices
  (a single slice has no slice axis to restore; 3D convolutions would see mostly padding); an in-plane model
  runs on a single slice as on any other;
- warned: restoring the slice axis of a scan whose slices are already as thin as its in-plane voxels, and a 3D
  model on thick slices (it refines every axis by the same factor);
- a model conditioned on the acquisition (``condition = acquisition``) is given each scan's description before it
  runs (:meth:`InferenceModel.condition`): the defaults of ``client.acquisition``, then what a DICOM input's headers
  say, then ``--acquisition``; warned: each field taken from the defaults. ``--acquisition`` for a model that is not
  conditioned is refused (it would change nothing);
- a model with a personal head (``personal = head``) is refused without a site's head file (``--head``): its
  checkpoint holds the shared body with the head as built, never trained. The head file must be of the site's
  format and hold exactly the model's head weights, with their shapes; warned: a head never trained or evaluated
  with this body (its fingerprint is not among the file's). ``--head`` for a model without a personal head is
  refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from pydicom.dataset import Dataset
from torch import nn

from client.data.normalise import fit_normalisation
from client.data.volume import Volume
from client.inference.errors import InferenceError
from client.state import load_state
from shared_models.checkpoint import load_checkpoint
from shared_models.conditioning import ACQUISITION_FIELDS, films, set_acquisition
from shared_models.image import MODALITIES, Normalisation
from shared_models.inference import model_spatial_dims, sr_factors
from shared_models.registry import family_of, personal_keys

#: A finished run's model in its run folder: ``server.checkpoint.FINAL`` (a site's code may not import the
#: coordinator's; tests/test_infer_model.py checks that the two names agree).
RUN_MODEL = "final_model.pt"
#: Fewest slices a model that restores the slice axis, or a 3D model, accepts.
MIN_SLICES = 4
#: Slice spacing / in-plane spacing below which slices count as thin, above which (x 2) as thick.
THIN_RATIO = 1.2
THICK_RATIO = 2.0
_RULE_KEYS = {"modality", "kind", "range"}
_NO_RULES_HINT = "the defaults are used (CT window -160..240 HU, MR foreground percentiles 0.5..99.5)"
#: Where a site keeps its head file, as messages show it (``client.state.site_state_dir``'s default below SITE).
_SITE_STATE = Path("SITE/.fedsr-state")


@dataclass(frozen=True, eq=False)
class InferenceModel:
    """A loaded checkpoint, ready to apply.

    ``net``: the network (eval mode, on the device it was loaded to). ``path``: the checkpoint file; ``sha256``:
    its hex digest. ``family``, ``scale``: from the checkpoint. ``factors``: output voxels per input voxel along
    X, Y, Z (e.g. (2, 2, 1): in-plane). ``rules``: ``{site: {"modality", "kind", "range"}}``, how each site
    mapped its scans to [0, 1] (CT: a HU window; MR: foreground percentiles), possibly empty. ``notes``: warnings
    about the model itself (a site's head never used with this body), repeated in every scan's warnings.
    """

    net: nn.Module
    path: Path
    sha256: str
    family: str
    scale: int
    factors: tuple[int, int, int]
    rules: dict[str, dict]
    notes: tuple[str, ...] = ()

    @property
    def spatial_dims(self) -> int:
        """2 or 3: the network's own dimensionality."""
        return model_spatial_dims(self.net)

    @property
    def restores_slices(self) -> bool:
        """Whether the output has more slices than the input (through-plane or 3D SR)."""
        return self.factors[2] > 1

    @property
    def modalities(self) -> list[str]:
        """The modalities its sites trained on (empty: the checkpoint does not say)."""
        return sorted({rule["modality"] for rule in self.rules.values()})

    @property
    def conditioned(self) -> bool:
        """Whether the network is conditioned on the acquisition (has a FiLM)."""
        return bool(films(self.net))

    def describe(self, digits: int = 64) -> str:
        """One line for the output's provenance: family, factor, axes and the checkpoint's hash (its first
        ``digits`` hex digits; a NIfTI header's description holds 79 characters)."""
        axes = "3D" if min(self.factors) > 1 else "through-plane" if self.restores_slices else "in-plane"
        return f"fedsr {self.family} SR x{self.scale} {axes}, checkpoint sha256:{self.sha256[:digits]}"

    def prepare(self, volume: Volume, site: str | None = None) -> tuple[Normalisation, list[str]]:
        """The intensity mapping for ``volume`` (its modality's rule from the checkpoint, fitted to the scan: the
        HU window for CT, the scan's own foreground percentiles for MR) and the warnings about an unusual fit.
        ``site``: whose rule, where the sites' rules for this modality differ. Raises :class:`InferenceError` for
        a model that does not fit the scan (see the module's checks)."""
        warnings = [*self.notes, *self._check_grid(volume)]
        if not self.rules:
            warnings.append(f"{self.path}: the checkpoint records no intensity rule: {_NO_RULES_HINT}")
            return fit_normalisation(volume), warnings
        rule = self._rule_for(volume, site)
        lo, hi = (float(v) for v in rule["range"])
        if volume.modality == "CT":
            return fit_normalisation(volume, ct_window=(lo, hi)), warnings
        return fit_normalisation(volume, mr_percentiles=(lo, hi)), warnings

    def check_acquisition(self, asked: Mapping[str, float]) -> None:
        """Refuse an acquisition description ``asked`` (``--acquisition``) for a model that is not conditioned."""
        if asked and not self.conditioned:
            raise InferenceError(self.path, "holds a model that is not conditioned on the acquisition (trained "
                                 "without condition = acquisition): --acquisition would change nothing",
                                 "leave --acquisition out")

    def condition(self, modality: str, header: Dataset | None, asked: Mapping[str, float]) -> list[str]:
        """Set a scan's acquisition description on a conditioned model (nothing for a blind one) and return the
        warnings naming each field taken from the defaults.

        ``modality``: the scan's ("MR"/"CT"). ``header``: a DICOM input's first file (None for NIfTI); its
        MagneticFieldStrength (T), SliceThickness (mm) and ConvolutionKernel are used. ``asked``: ``{field: value}``
        (``--acquisition``, units of ``shared_models.conditioning.ACQUISITION_FIELDS``), over the headers.
        """
        self.check_acquisition(asked)
        if not self.conditioned:
            return []
        # imported on use: client.acquisition loads the site's training stack (about 1 s), needless for a blind model
        from client.acquisition import DEFAULT_FIELD_STRENGTH_T, DEFAULTS, header_description

        given = {**header_description(header), **asked}
        description = {"field_strength_t": DEFAULT_FIELD_STRENGTH_T[modality], **DEFAULTS, **given}
        set_acquisition(self.net, description)
        return [f"acquisition: {name} from the default {value:g}; pass --acquisition to set it"
                for name, value in description.items() if name not in given]

    def _rule_for(self, volume: Volume, site: str | None) -> dict:
        if site is not None and site not in self.rules:
            raise InferenceError(self.path, f"has no site {site!r}; its sites: {', '.join(sorted(self.rules))}",
                                 "give one of them to --site")
        chosen = {name: rule for name, rule in self.rules.items()
                  if rule["modality"] == volume.modality and site in (None, name)}
        if not chosen:
            trained = " and ".join(self.modalities) if site is None else f"{self.rules[site]['modality']} (site {site})"
            raise InferenceError(
                volume.source,
                f"is a {volume.modality} scan; the model was trained on {trained} scans",
                "use a model trained on this modality (a NIfTI file records none: give the right one to --modality)",
            )
        distinct = {(r["kind"], *map(float, r["range"])) for r in chosen.values()}
        if len(distinct) > 1:
            listed = "; ".join(f"{name}: {r['kind']} {r['range'][0]:g}..{r['range'][1]:g}"
                               for name, r in sorted(chosen.items()))
            raise InferenceError(self.path, f"its sites mapped {volume.modality} intensities differently ({listed})",
                                 "choose one site's rule with --site NAME")
        return next(iter(chosen.values()))

    def _check_grid(self, volume: Volume) -> list[str]:
        """Refuse a scan too thin for the model; warnings for an unusual but workable fit."""
        slices = volume.array.shape[2]
        spacing_z, in_plane = volume.spacing[2], max(volume.spacing[:2])
        if (self.restores_slices or self.spatial_dims == 3) and slices < MIN_SLICES:
            what = "restores the slice axis" if self.spatial_dims == 2 else "is a 3D model"
            raise InferenceError(
                volume.source,
                f"holds {slices} slice(s); the model {what} and needs at least {MIN_SLICES}",
                "give the whole series, or use an in-plane (2D) model",
            )
        warnings = []
        if self.restores_slices and self.spatial_dims == 2 and spacing_z <= THIN_RATIO * in_plane:
            warnings.append(
                f"{volume.source}: its slices ({spacing_z:.3g} mm) are already about as thin as its in-plane voxels "
                f"({in_plane:.3g} mm): the model makes {self.factors[2]}x more slices all the same"
            )
        if self.spatial_dims == 3 and spacing_z > THICK_RATIO * in_plane:
            warnings.append(
                f"{volume.source}: thick slices ({spacing_z:.3g} mm, in-plane {in_plane:.3g} mm) for a 3D model, which "
                "refines every axis by the same factor; an in-plane or through-plane model fits such scans better"
            )
        return warnings


def checkpoint_file(path: Path) -> Path:
    """``path`` itself, or for a run folder its final model (:data:`RUN_MODEL`)."""
    if not path.is_dir():
        return path
    final = path / RUN_MODEL
    if not final.is_file():
        raise InferenceError(path, f"is a folder without {RUN_MODEL}: not the folder of a finished run",
                             "give a finished run's folder or a checkpoint file (.pt)")
    return final


def load_model(path: str | Path, device: torch.device | str = "cpu", head: str | Path | None = None) -> InferenceModel:
    """Load the checkpoint at ``path`` (a file, or a run folder: its final model) onto ``device``; ``head``: a
    site's head file (``personal-head-<hash>.pt`` in its state folder), required by a model with a personal head.

    Raises FileNotFoundError (no such file), ``CheckpointError`` (not a readable checkpoint), ``StateError`` (a
    head file that cannot be read) or :class:`InferenceError` (a run folder without a final model, a malformed
    intensity rule, a personal head missing, not fitting the model, or given for a model without one).
    """
    file = checkpoint_file(Path(path))
    net, meta = load_checkpoint(file, map_location=device)
    notes = _load_head(net, file, None if head is None else Path(head))
    return InferenceModel(
        net=net,
        path=file,
        sha256=_sha256(file),
        family=str(meta["model"]["name"]),
        scale=int(meta["scale"]),
        factors=_factors(net, device),
        rules=_rules(file, meta.get("normalisation")),
        notes=tuple(notes),
    )


def _factors(net: nn.Module, device: torch.device | str) -> tuple[int, int, int]:
    """``sr_factors`` of ``net``; a conditioned one is measured with a placeholder description (the grid does not
    depend on it), unset again so that only a scan's own description (:meth:`InferenceModel.condition`) is used."""
    conditioning = films(net)
    if conditioning:
        set_acquisition(net, {f.name: 0.0 for f in ACQUISITION_FIELDS})
    try:
        return sr_factors(net, device)
    finally:
        for film in conditioning:
            film.vector = None


def _load_head(net: nn.Module, file: Path, head: Path | None) -> list[str]:
    """Put the site's head from the file ``head`` into ``net`` (loaded from the checkpoint ``file``), checked;
    returns the warnings (a head never trained or evaluated with this body). Nothing for a model without a
    personal head, which refuses ``head``."""
    keys = personal_keys(net)
    if not keys:
        if head is not None:
            raise InferenceError(head, f"is a site's personal head, and {file} holds a model without one (trained "
                                 "without personal = head)", "leave --head out")
        return []
    # imported on use: client.personal loads the site's training stack (about 1 s), needless for most models
    from client.personal import STATE_FORMAT, body_fingerprint, head_path

    expected = head_path(net, _SITE_STATE)
    if head is None:
        raise InferenceError(file, "holds a model with a personal head (personal = head): it has the shared body "
                             "with the head as built, never trained, so it cannot be applied as it is",
                             f"give the head of the site whose scans these are: --head {expected} (in that site's "
                             "state folder)")
    saved = load_state(head)
    if saved is None:
        raise InferenceError(head, "does not exist", f"give the site's head file, {expected}")
    stored = saved.get("head") if saved.get("format") == STATE_FORMAT else None
    state = net.state_dict()
    if not isinstance(stored, dict) or set(stored) != keys or not all(
            isinstance(stored[k], torch.Tensor) and stored[k].shape == state[k].shape for k in keys):
        raise InferenceError(head, f"is not a personal head of this model ({file}: the head weights of "
                             f"{len(keys)} tensors with their shapes)",
                             f"give the head file the site wrote while training this model, {expected.name}")
    net.load_state_dict(stored, strict=False)
    if body_fingerprint(family_of(net).shared_state(net, None)) in saved.get("bodies", []):
        return []
    return [f"{head}: this head was never trained or evaluated with the body in {file}; the output may be worse "
            "than the site's own scores (use the head file from the same run)"]


def _rules(file: Path, stored: object) -> dict[str, dict]:
    """The checkpoint's ``{site: rule}``, each rule checked (an older or foreign layout is refused)."""
    if not stored:
        return {}
    if not isinstance(stored, dict) or not all(
        isinstance(rule, dict) and set(rule) == _RULE_KEYS and rule["modality"] in MODALITIES
        and len(rule["range"]) == 2 for rule in stored.values()
    ):
        raise InferenceError(file, "its intensity rules are not {site: {modality, kind, range}}",
                             "use a checkpoint written by a fedsr run (final_model.pt)")
    return dict(stored)


def _sha256(file: Path) -> str:
    """Hex SHA-256 of the file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
