"""The site's half of central DP with client-side clipping (``dp = "central"``, ``dp-clipping = "client-*"``).

Flower's client-side DP wrappers send the clipping norm in the train message's config; Flower's mods
(``fixedclipping_mod``, ``adaptiveclipping_mod``) then clip the site's update before it leaves. Those mods turn a
message without the norm into an error, so :func:`central_clipping_mod` hands them only the federated ``train``
messages that carry it, and picks the one the run's ``dp-clipping`` names (the adaptive one also reports whether
the update was clipped, which the coordinator's adaptive wrapper needs).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.app.message_type import MessageType
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM


def central_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod: clip the federated update as the coordinator's client-side DP wrapper asks."""
    config = msg.content.config_records.get("config") if msg.has_content() else None
    if msg.metadata.message_type != MessageType.TRAIN or config is None or KEY_CLIPPING_NORM not in config:
        return call_next(msg, context)
    flower_mod = adaptiveclipping_mod if config.get("dp-clipping") == "client-adaptive" else fixedclipping_mod
    return flower_mod(msg, context, call_next)
