"""Personalisation (FedPer-style, ``personal = "head"``): what stays at each site, as the report states it.

SR networks here have no BatchNorm, so FedBN's split (local normalisation statistics) does not apply; instead each
family declares its reconstruction head (``register_model(head=...)``: the upsampler and the output conv(s)), every
site keeps its own head, and only the body travels and is averaged (:func:`shared_models.registry.personal_keys`
leaves the head out of the family's ``shared_state``). The site side is ``client.personal``.
"""

from __future__ import annotations

from torch import nn

from shared_models.registry import family_of, personal_keys, unwrap
from shared_models.settings import SiteSettings


def personalisation_summary(model: nn.Module, settings: SiteSettings) -> dict | None:
    """What the run's report says of personalisation (None when the model keeps nothing at the sites): the
    personal modules and weights, their share of the parameters, where a site keeps them and how a site without
    its own head is served."""
    keys = personal_keys(model)
    if not keys:
        return None
    state = unwrap(model).state_dict()
    personal = sum(state[key].numel() for key in keys)
    return {
        "personal": "head",
        "modules": list(family_of(model).head),
        "weights": sorted(keys),
        "personal_parameters": personal,
        "shared_parameters": sum(tensor.numel() for tensor in state.values()) - personal,
        "kept": "each site keeps its own head in its state folder (personal-head-*.pt, written atomically), across "
                "rounds and runs; it never leaves the site: only the body is sent and averaged",
        "evaluation": "a site scores every model with its own head: the one it trained with that model, else one "
                      "fitted for it (below)",
        "new_site": f"a site without a head for a model (a new site, or one scoring a federation it never trained "
                    f"in) first fits one on its training split, never its test split: {settings.local_steps} Adam "
                    "steps (local-steps) with the shared body frozen (FedRep)",
        "released": "final_model.pt holds the shared body and the initial head: a site applies it with its own head",
    }
