"""A site's refusals: a request outside its ``site.toml`` ``[policy]`` is refused, not obeyed and not an error.

:func:`check_policy` compares a round's settings with the site's :class:`client.data.siteconfig.SitePolicy` and
raises :class:`SiteRefusal`; :func:`refusal_mod`, a Flower client mod around every handler, turns any
``SiteRefusal`` (a policy's, or a later check's such as a privacy budget's) into an ordinary reply::

    RecordDict({"refusal": ConfigRecord({"category": ..., "reason": ...}), "site": ConfigRecord({"name": ...})})

The coordinator treats the site as absent for that request, logs and records the category and reason, and goes
on with the other sites. The reason is a short sentence the coordinator may show (the setting, the requested value
and the site's limit; never a path); the detail stays in the site's own log.

What a policy applies to, by message type: training (``train``, ``train.local``, ``train.pooled``) is checked
against every limit; scoring (``evaluate``, ``evaluate.cross``) only against ``allowed_models``, since only the
weights of the model it is sent enter the site and only numbers leave; ``query.describe`` is always answered.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from client.data.siteconfig import SitePolicy

if TYPE_CHECKING:
    from client.tasks.base import RoundJob

log = logging.getLogger(__name__)

#: The reply's record that carries a refusal (the coordinator reads the same key).
REFUSAL = "refusal"
#: ``category`` of a refusal by the site's ``[policy]``.
POLICY = "policy"
#: Message types that train on the site's data (every policy limit applies).
TRAINING = ("train", "train.local", "train.pooled")
#: Message types that score a model sent to the site (only ``allowed_models`` applies).
SCORING = ("evaluate", "evaluate.cross")


class SiteRefusal(Exception):
    """A request the site declines.

    ``category``: what kind of limit (``policy``; a privacy budget adds ``privacy-budget``). ``reason``: one short
    sentence for the coordinator: the setting, the requested value and the site's limit, never a path or anything
    of a scan. ``site``: the site's display name. ``detail``: more for the site's own log only (never sent).
    """

    def __init__(self, category: str, reason: str, site: str, detail: str = "") -> None:
        super().__init__(f"{category}: {reason}")
        self.category = category
        self.reason = reason
        self.site = site
        self.detail = detail


def check_policy(policy: SitePolicy, job: RoundJob, message_type: str, site: str) -> None:
    """Raise :class:`SiteRefusal` (category ``policy``) when ``job``, sent as ``message_type``, is outside ``policy``.

    ``site`` is the site's display name, for the reply. Every violated limit is named in the reason.
    """
    problems = _problems(policy, job, message_type)
    if problems:
        raise SiteRefusal(POLICY, "; ".join(problems), site,
                          detail=f"{message_type} of round {job.server_round}, model {job.model}, batch-size "
                                 f"{job.batch_size}, local-steps {job.local_steps}, num-rounds {job.num_rounds}, "
                                 f"loss {job.loss!r}; the site's policy: {policy}")


def _problems(policy: SitePolicy, job: RoundJob, message_type: str) -> list[str]:
    """The limits of ``policy`` that ``job`` breaks, each a sentence naming the setting, its value and the limit."""
    if message_type not in TRAINING + SCORING:
        return []
    problems = []
    if policy.allowed_models is not None and job.model not in policy.allowed_models:
        problems.append(f"model {job.model!r} is not among this site's allowed models "
                        f"({', '.join(policy.allowed_models)})")
    if message_type in SCORING:
        return problems
    if job.batch_size < policy.min_batch_size:
        problems.append(f"batch-size {job.batch_size} is below this site's minimum of {policy.min_batch_size}")
    if job.local_steps < policy.min_local_steps:
        problems.append(f"local-steps {job.local_steps} is below this site's minimum of {policy.min_local_steps}")
    rounds = max(job.num_rounds, job.server_round)
    if rounds > policy.max_rounds:
        problems.append(f"{rounds} rounds (num-rounds {job.num_rounds}, server-round {job.server_round}) exceed this "
                        f"site's maximum of {policy.max_rounds}")
    if policy.allowed_losses is not None:
        from shared_models.losses import parse_loss  # with torch, which a site that trains has loaded anyway

        refused = [term for term in parse_loss(job.loss) if term not in policy.allowed_losses]
        if refused:
            problems.append(f"loss term(s) {', '.join(refused)} are not among this site's allowed losses "
                            f"({', '.join(policy.allowed_losses)})")
    return problems


def refusal_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A Flower client mod: a :class:`SiteRefusal` raised by the handler becomes the refusal reply (module doc),
    logged at WARNING with its detail on the site; every other outcome passes through unchanged."""
    try:
        return call_next(msg, context)
    except SiteRefusal as refusal:
        log.warning("site %s refused %s: %s: %s%s", refusal.site, msg.metadata.message_type, refusal.category,
                    refusal.reason, f" ({refusal.detail})" if refusal.detail else "")
        content = RecordDict({REFUSAL: ConfigRecord({"category": refusal.category, "reason": refusal.reason}),
                              "site": ConfigRecord({"name": refusal.site})})
        return Message(content=content, reply_to=msg)
