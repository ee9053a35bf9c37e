"""A site's own reconstruction head (``personal = "head"``, FedPer / FedRep): kept in its state folder, used for
every score the site computes, never sent.

The head file (``personal-head-<model>.pt`` in the job's state folder, one per architecture and purpose, written
atomically) holds the head's weights, the round it was trained in and the fingerprints of the bodies it goes with:
the body the site sent after training it, and each global body it was then evaluated with.

- Training (round r): the site's head from an earlier round of the same training (saved in a round < r: rounds only
  grow within a run, and a resumed run goes on), else the head as built (a new run or a new federation starts as
  the blind model does); trained jointly with the body; saved after the round.
- Per-round evaluation: the head saved in this round or before, else (the site never trained) a fitted one.
- Cross-site evaluation: for each model, the head the site trained or evaluated with that very body, else one
  fitted for it (a held-out site, a model trained elsewhere), starting from its own head.
- Fitting (FedRep): :func:`fit_head`, ``local-steps`` Adam steps on the site's training split with everything but
  the head frozen; the test split is never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import weakref
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from client.pairs import PreparedSite, site_seed
from client.state import StateError, load_state, save_state_atomic, site_state_dir
from client.tasks.base import RoundJob
from client.training import train_supervised
from shared_models.registry import model_spec, personal_keys, unwrap

log = logging.getLogger(__name__)

STATE_FORMAT = "fedsr-personal-head"
STATE_VERSION = 1
#: Bodies a head file remembers (the body sent after training, then the global bodies it was evaluated with).
REMEMBERED_BODIES = 8
#: The head of each model as it was built (taken when the model is first loaded with the coordinator's weights).
_BUILT: weakref.WeakKeyDictionary[nn.Module, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()


def uses_head(job: RoundJob) -> bool:
    """Whether the job's sites keep their own heads."""
    return job.personal == "head"


def head_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's personal weights (empty for a model that keeps none)."""
    state = unwrap(model).state_dict()
    return {key: state[key].detach().clone() for key in personal_keys(model)}


def head_path(model: nn.Module, folder: Path) -> Path:
    """The head file of this architecture in ``folder`` (one per model spec: other architectures never collide)."""
    spec = json.dumps(model_spec(model), sort_keys=True)
    return Path(folder) / f"personal-head-{hashlib.sha256(spec.encode()).hexdigest()[:12]}.pt"


def body_fingerprint(weights: Mapping[str, torch.Tensor]) -> str:
    """A digest of weights (keys and float32 values): tells whether a model sent to the site is a body the site's
    head was trained or evaluated with."""
    digest = hashlib.sha256()
    for key in sorted(weights):
        digest.update(key.encode())
        digest.update(weights[key].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def start_head(model: nn.Module, site: PreparedSite, job: RoundJob) -> None:
    """When the coordinator's weights are loaded (into a model as built: its head is remembered then): the site's
    head from an earlier round of this training, else the head as built (what training starts from, and what
    the released model holds)."""
    if not uses_head(job):
        return
    root = unwrap(model)
    if root not in _BUILT:
        _BUILT[root] = head_state(root)
    saved = _read(head_path(model, job.state_folder(site.directory)), model, site)
    _load_head(model, saved["head"] if saved is not None and saved["round"] < job.server_round else _BUILT[root])


def keep_head(model: nn.Module, site: PreparedSite, job: RoundJob, body: Mapping[str, torch.Tensor]) -> None:
    """After training: save the site's head (atomically) with the round and the ``body`` the site sends."""
    if uses_head(job):
        _save(head_path(model, job.state_folder(site.directory)), model, job.server_round, [body_fingerprint(body)])


def evaluation_head(model: nn.Module, weights: Mapping[str, torch.Tensor], site: PreparedSite, job: RoundJob) -> None:
    """Before a per-round evaluation of the global ``weights`` (already loaded): the site's head saved in this
    round or before (which then remembers this body), else one fitted to the body (not saved)."""
    if not uses_head(job):
        return
    path = head_path(model, job.state_folder(site.directory))
    saved = _read(path, model, site)
    if saved is None or saved["round"] > job.server_round:
        fit_head(model, site, job)
        return
    _load_head(model, saved["head"])
    bodies = [*saved["bodies"], body_fingerprint(weights)]
    _save(path, model, saved["round"], list(dict.fromkeys(bodies))[-REMEMBERED_BODIES:])


def scoring_head(model: nn.Module, weights: Mapping[str, torch.Tensor], site: PreparedSite, job: RoundJob) -> None:
    """Before the cross-site scoring of ``weights`` (loaded by the task's ``load_global``): the head the site
    trained or evaluated with this very body (in any of its state folders: federated, local-only, pooled), else one
    fitted to it starting from the site's own head (the head as built when it has none). Nothing is saved."""
    if not uses_head(job):
        return
    body = body_fingerprint(weights)
    root = site_state_dir(job.node_config, site.directory)
    name = head_path(model, root).name
    for path in (root / name, *sorted(root.glob(f"*/{name}"))):
        saved = _read(path, model, site)
        if saved is not None and body in saved["bodies"]:
            _load_head(model, saved["head"])
            return
    own = _read(head_path(model, job.state_folder(site.directory)), model, site)
    if own is not None:
        _load_head(model, own["head"])
    fit_head(model, site, job)


def fit_head(model: nn.Module, site: PreparedSite, job: RoundJob) -> float:
    """FedRep's head fit: ``job.local_steps`` Adam steps of the job's loss on patches of the site's training split,
    every weight but the head frozen; the patches are seeded per (site, run seed). Returns the training loss (mean
    of the last quarter of the steps)."""
    root = unwrap(model)
    head = personal_keys(root)
    trainable = {name: p.requires_grad for name, p in root.named_parameters()}
    rng = np.random.default_rng(site_seed(f"{site.name}:head", job.seed))
    try:
        for name, p in root.named_parameters():
            p.requires_grad_(name in head)
        stats = train_supervised(
            root, site.pairing.sampler(site.train, site.scale, job.patch_size, rng), steps=job.local_steps,
            batch_size=job.batch_size, learning_rate=job.learning_rate, loss=job.loss, device=job.torch_device,
        )
    finally:
        for name, p in root.named_parameters():
            p.requires_grad_(trainable[name])
    log.info("site %s: fitted its own head (%d steps, body frozen, training split): loss %.4g", site.name,
             job.local_steps, stats.loss)
    return stats.loss


def _load_head(model: nn.Module, head: Mapping[str, torch.Tensor]) -> None:
    """Put a head's weights into ``model`` (exactly its personal keys; shapes checked)."""
    root = unwrap(model)
    missing, unexpected = sorted(personal_keys(root) - set(head)), sorted(set(head) - personal_keys(root))
    if missing or unexpected:
        raise ValueError(f"head weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    root.load_state_dict(dict(head), strict=False)


def _save(path: Path, model: nn.Module, trained_round: int, bodies: list[str]) -> None:
    save_state_atomic(path, {
        "format": STATE_FORMAT, "version": STATE_VERSION, "model": json.dumps(model_spec(model), sort_keys=True),
        "round": int(trained_round), "head": head_state(model), "bodies": bodies,
    })


def _read(path: Path, model: nn.Module, site: PreparedSite) -> dict | None:
    """The head file at ``path`` when it is one of this model's; None when there is none or it cannot be used
    (logged: the site then trains or fits a head afresh, losing nothing that must be kept)."""
    try:
        saved = load_state(path)
    except StateError as err:
        log.warning("site %s: its head file cannot be used, a new head is made: %s", site.name, err)
        return None
    if saved is None:
        return None
    if saved.get("format") != STATE_FORMAT or saved.get("model") != json.dumps(model_spec(model), sort_keys=True) \
            or set(saved.get("head", {})) != personal_keys(model):
        log.warning("site %s: %s is not this model's head; a new head is made", site.name, path)
        return None
    return saved
