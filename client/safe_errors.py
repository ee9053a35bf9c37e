"""What a site says when it fails: an error category and a fixed sentence, never a path, file name or header value.

Flower turns an exception a handler raises into an error reply whose reason is the exception's type and text, and
a site's exceptions name its folder, its scan files and sometimes header values. :func:`safe_errors_mod`, the
outermost Flower client mod of every fedsr ClientApp, catches the exception first: the full detail (message and
traceback) goes to the site's own log (logger ``client.safe_errors``, level ERROR), and the coordinator gets
``Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=...)`` with the reason::

    CATEGORY: SENTENCE                      e.g. "out-of-memory: the site ran out of memory; ..."
    CATEGORY: SENTENCE. Detail: PROBLEM. HINT  (fedsr's own input errors only, scrubbed: see below)

Categories (:data:`CATEGORIES` holds each one's sentence):

- ``site-data``: the site's folder, scans or site.toml (any :class:`shared_models.errors.ExplainedError` but the
  state folder's);
- ``site-state``: the site's state folder (:class:`client.state.StateError`);
- ``settings``: the round settings the coordinator sent cannot be read at the site (raised while
  ``client.tasks.base.RoundJob.from_config`` parses them: another fedsr version, an unknown model family);
- ``training-diverged``: the training loss became NaN or infinite (``FloatingPointError``);
- ``out-of-memory``: ``MemoryError`` or torch's ``OutOfMemoryError``;
- ``internal``: anything else.

Only an :class:`~shared_models.errors.ExplainedError` adds a detail, and only its path-free parts
(``ExplainedError.reason``: problem and hint), which :func:`scrub` checks once more: parenthesised asides
(exception texts, examples), quoted values, anything that looks like a path, a file name or an identifier are
removed before the text leaves the site. Exceptions of the types in :data:`PASS_THROUGH` (a
:class:`client.policy.SiteRefusal`) are not converted.
"""

from __future__ import annotations

import logging
import re
import sys
from types import CodeType, TracebackType

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from client.data.files import SITE_CONFIG_NAME
from client.policy import SiteRefusal
from shared_models.errors import ExplainedError

log = logging.getLogger(__name__)

#: Exception types that leave this mod as they were raised: a refusal is not an error, and
#: :func:`client.policy.refusal_mod` answers it (add a type here for any other mod that answers its own).
PASS_THROUGH: tuple[type[BaseException], ...] = (SiteRefusal,)

#: Every category a site's error reply may carry, with the fixed sentence that follows it.
CATEGORIES: dict[str, str] = {
    "site-data": "the site's folder, scans or site.toml cannot be used; its operator runs `fedsr sites check` on the "
                 "site folder and reads the site's log",
    "site-state": "the site's state folder cannot be used; its operator checks the SuperNode's state-dir and reads "
                  "the site's log",
    "settings": "the site cannot read the round settings the coordinator sent; check that the site and the "
                "coordinator run the same fedsr version, and read the site's log",
    "training-diverged": "local training diverged (the loss became NaN or infinite); try a lower learning-rate",
    "out-of-memory": "the site ran out of memory; its operator frees memory or the run uses a smaller batch-size, "
                     "patch-size or model-preset",
    "internal": "an unexpected error at the site; its operator finds the traceback in the site's log",
}
#: What separates the fixed sentence from the scrubbed detail of an ExplainedError.
DETAIL = ". Detail: "
#: The longest detail sent (characters); longer ones are cut with an ellipsis.
MAX_DETAIL = 240

# Scrubbing is fedsr's own: no maintained library removes paths and identifiers from free text. Order matters:
# asides and quoted values go first, then whatever token still looks like a path, a file name or an identifier.
_ASIDE = re.compile(r"\s*\([^()]*\)")
_QUOTED = re.compile(r"(?<!\w)(['\"`])(?:(?!\1).)*\1(?!\w)")
_TOKEN = re.compile(r"[^\s,;()\[\]{}<>]+")
_FILE_NAME = re.compile(r"[\w.-]*\w\.[A-Za-z][A-Za-z0-9]{0,5}")
_IDENTIFIER = re.compile(r"\d{4,}|[\^@=]|^\d+(?:\.\d+){3,}$|^(?=.*[A-Za-z])(?=.*\d)(?=.*[_-])")
#: Dotted words that are neither file names nor identifiers.
_KEEP = frozenset({SITE_CONFIG_NAME, "e.g", "i.e"})


def safe_errors_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod: the handler's reply, or, when it raises, the error reply :func:`reply_reason` words.

    The exception (message and traceback: paths, file names) is logged at the site at level ERROR; exceptions of
    a :data:`PASS_THROUGH` type, and those that are not an ``Exception`` (KeyboardInterrupt), are raised on.
    """
    try:
        return call_next(msg, context)
    except PASS_THROUGH:
        raise
    except Exception as error:
        reason = reply_reason(error)
        log.error("%s failed at this site; the coordinator is told only %r", msg.metadata.message_type, reason,
                  exc_info=error)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def reply_reason(error: BaseException) -> str:
    """``"CATEGORY: SENTENCE"``, plus ``". Detail: ..."`` (:func:`scrub` of its reason) for an ExplainedError."""
    category = category_of(error)
    reason = f"{category}: {CATEGORIES[category]}"
    if isinstance(error, ExplainedError):
        detail = scrub(error.reason)
        if detail:
            reason += DETAIL + detail
    return reason


def category_of(error: BaseException) -> str:
    """The :data:`CATEGORIES` key of ``error`` (see the module docstring)."""
    state_error = _loaded_type("client.state", "StateError")
    if state_error is not None and isinstance(error, state_error):
        return "site-state"
    if isinstance(error, ExplainedError):
        return "site-data"
    if _raised_within(error.__traceback__, _settings_parser()):
        return "settings"
    if isinstance(error, FloatingPointError):
        return "training-diverged"
    torch_oom = _loaded_type("torch", "OutOfMemoryError")
    if isinstance(error, MemoryError) or (torch_oom is not None and isinstance(error, torch_oom)):
        return "out-of-memory"
    return "internal"


def scrub(text: str) -> str:
    """``text`` without parenthesised asides or quoted values (``'…'``), and with each token that looks like a
    path (``<path>``), a file name (``<file>``, site.toml excepted) or an identifier (four digits in a row, a
    DICOM UID, a DICOM name's ``^``, ``key=value``, letters and digits joined by ``_`` or ``-``: ``<id>``)
    replaced; whitespace collapsed,
    cut to :data:`MAX_DETAIL` characters."""
    previous = None
    while previous != text:  # innermost asides first, until none is left
        previous, text = text, _ASIDE.sub("", text)
    text = _QUOTED.sub("'…'", text)
    text = _TOKEN.sub(lambda match: _scrub_token(match.group()), text)
    text = " ".join(text.split())
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 1].rstrip() + "…"


def _scrub_token(token: str) -> str:
    """``token`` or its placeholder (:func:`scrub`); trailing punctuation is kept."""
    word = token.rstrip(".:!?'\"")
    end = token[len(word):]
    if "/" in word or "\\" in word or word.startswith("~"):
        return "<path>" + end
    if word in _KEEP:
        return token
    if _FILE_NAME.fullmatch(word):
        return "<file>" + end
    if _IDENTIFIER.search(word):
        return "<id>" + end
    return token


def _loaded_type(module: str, name: str) -> type[BaseException] | None:
    """``module.name`` when ``module`` is imported, else None: an exception of a module never imported cannot have
    been raised, and this module stays free of torch (the process that only builds the ClientApp never needs it)."""
    return getattr(sys.modules.get(module), name, None)


def _settings_parser() -> CodeType | None:
    """The code of ``RoundJob.from_config`` (which parses the coordinator's round settings), once it is imported."""
    round_job = _loaded_type("client.tasks.base", "RoundJob")
    return round_job.from_config.__func__.__code__ if round_job is not None else None  # type: ignore[attr-defined]


def _raised_within(trace: TracebackType | None, code: CodeType | None) -> bool:
    """Whether a frame running ``code`` is on the traceback ``trace``."""
    while trace is not None and code is not None:
        if trace.tb_frame.f_code is code:
            return True
        trace = trace.tb_next
    return False
